"""What a model's results depend on, as a short digest of files: a resumed job compares it with the
one its earlier results were made with, and redoes the work when they differ.

A model folder can refer to folders of its own (a frozen image encoder or decoder saved as a
reference, a LoRA adapter's base decoder), and a feature store to its encoder folder: those are read
at load time, so they count too. The digest reads names, sizes and modification times, never the
weights, so it costs a folder walk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from prefixcap.model.config import CONFIG_NAME


def files_fingerprint(folder: str | Path) -> str:
    """A digest of the names, sizes and modification times of every file below `folder` (through
    links: hub snapshots link to their blobs). It changes when anything is saved again there."""
    digest = hashlib.sha256()
    for parent, subfolders, files in os.walk(folder, followlinks=True):
        subfolders.sort()
        for name in sorted(files):
            path = os.path.join(parent, name)
            try:
                status = os.stat(path)
            except OSError:
                continue  # a broken link: loading reports it
            entry = f"{os.path.relpath(path, folder)}\0{status.st_size}\0{status.st_mtime_ns}\0"
            digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def source_fingerprint(source: str | Path) -> str | None:
    """The files of a component that loads from `source`: a local folder's, or a hub id's cached
    snapshot (whose path names the revision); None for a hub id that is not cached."""
    folder = local_folder(source)
    return None if folder is None else f"{folder}\0{files_fingerprint(folder)}"


def model_fingerprint(directory: str | Path) -> str:
    """A digest of a model folder's files and of the folders its config.json refers to (image
    encoder, decoder or a LoRA adapter's base decoder, when they are not stored inside it)."""
    directory = Path(directory)
    parts = [files_fingerprint(directory)]
    try:
        config = json.loads((directory / CONFIG_NAME).read_bytes())
    except (OSError, ValueError):
        config = None  # loading the model reports it
    if isinstance(config, dict):
        for key, stored in (("vision_encoder", "vision_encoder"), ("decoder", "decoder")):
            reference = config.get(key)
            if isinstance(reference, str) and not (directory / stored).is_dir():
                parts.append(f"{key}\0{reference}\0{source_fingerprint(reference)}")
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def local_folder(source: str | Path) -> Path | None:
    """The folder a component loads from: `source` itself when it is a folder, else the cached
    snapshot of a hub id (nothing is downloaded), else None."""
    path = Path(source)
    if path.is_dir():
        return path.resolve()
    if path.exists() or str(source).count("/") > 1:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
