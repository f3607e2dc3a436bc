"""Sidecar captions: one `IMAGE.txt` per image, the layout image-generator trainers read (kohya-ss,
OneTrainer, diffusers' folder datasets): `photos/dog_01.png` gets `photos/dog_01.txt`.

A job is planned before any model loads (`plan_sidecars`): the images are found, each is paired with
its caption file (beside it, or at the same relative path under a separate folder for read-only
image trees), and, under the default `skip` policy, images whose caption file exists drop out. A rerun
of a finished folder therefore costs a folder walk, and a rerun after a crash continues where it
stopped. Each caption file is written atomically (`prefixcap.system.atomic`): a killed run leaves complete
files or none, and the next run removes the temporaries it left.

Caption files stay in the tree the user named: folder walks follow only the links that stay inside
it, and every file is checked against its tree again when written. An existing caption file is
replaced only when it is a regular file we may write (its mode is kept) or a link (replaced, never
written through); its text is joined (`append`, `prepend`) only from a regular file of at most
`MAX_CAPTION_FILE_BYTES`. Anything else fails that image, and the run goes on.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.expand import expand_inputs, is_within
from prefixcap.inputs.sources import LocalPath, RemoteShard, as_source, file_identity, is_shard
from prefixcap.jobs.writers import printable, write_errors
from prefixcap.options import CaptionRequest
from prefixcap.system.atomic import write_atomic
from prefixcap.system.files import read_regular

CAPTION_SUFFIX = ".txt"
# What to do with an image whose caption file exists: leave it (and do not caption the image), replace
# the file, or join the new caption after or before the text already there with SEPARATOR.
EXISTING = ("skip", "overwrite", "append", "prepend")
SEPARATOR = ", "  # tag-style captions ("sks person, a man on a beach") are comma-separated
# The largest existing caption file whose text is joined: far above any caption, and a bound on
# what a mistaken file (a dataset, a disk image) can cost.
MAX_CAPTION_FILE_BYTES = 1 << 20
# The temporary names `atomic_path` gives: ".NAME.<8 random characters>.tmp".
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


@dataclass(frozen=True)
class Sidecar:
    image: LocalPath
    path: Path  # its caption file
    tree: str  # the real folder the caption file must stay in: the input folder, or --sidecar-dir OUT


@dataclass
class SidecarPlan:
    todo: list[Sidecar]  # images to caption, in input order
    skipped: list[Sidecar]  # images left alone: their caption file exists (policy `skip`)
    # (input, reason) for inputs that matched nothing, folders that could not be read, links not followed
    missing: list[tuple[str, str]] = field(default_factory=list)
    # images not captioned because their caption file cannot be written, with the reason
    refused: list[tuple[Sidecar, ImageLoadError]] = field(default_factory=list)


@dataclass
class SidecarSummary:
    written: int = 0  # caption files written (or, in a dry run, that would be)
    skipped: int = 0
    failed: int = 0  # unreadable images, and caption files that could not be written or joined
    dry_run: bool = False

    def __str__(self) -> str:
        written = (
            f"dry run, no file changed: {self.written} would be written" if self.dry_run else f"{self.written} written"
        )
        return f"{written}, {self.skipped} skipped (caption file exists), {self.failed} failed"


def plan_sidecars(inputs: Sequence[str], *, out_dir: str | Path | None = None, existing: str = "skip") -> SidecarPlan:
    """Pair the images of `inputs` (files, folders, globs) with their caption files: `IMAGE.txt`
    beside each image, or with `out_dir`, the image's path relative to the input folder it was
    found in, under `out_dir` (every input must then be a folder). Refuses, before any work,
    remote inputs, WebDataset shards and dataset files (their images have no file of their own to
    sit beside), two images that would share a caption file (`a.jpg` and `a.png`), a caption file
    that is an input, and folders where caption files cannot be created."""
    if existing not in EXISTING:
        raise ValueError(f"unknown existing-file policy {existing!r}; valid: {', '.join(EXISTING)}")
    sidecars, missing = _pair(inputs, None if out_dir is None else Path(out_dir))
    _check_unique(sidecars)
    plan = SidecarPlan([], [], missing)
    for sidecar in sidecars:
        exists, problem = _existing_file(sidecar, existing)
        if problem is not None:
            plan.refused.append((sidecar, ImageLoadError(sidecar.image, problem)))
        else:
            (plan.skipped if exists and existing == "skip" else plan.todo).append(sidecar)
    _check_writable(plan.todo)
    return plan


def caption_sidecars(
    captioner: Any,
    sidecars: Sequence[Sidecar],
    request: CaptionRequest,
    *,
    existing: str = "skip",
    dry_run: bool = False,
    batch_size: int | None = None,
    num_workers: int = 4,
    progress: Any = None,
    on_result: Callable[[Sidecar, str | ImageLoadError], None] | None = None,
) -> SidecarSummary:
    """Caption the images of `sidecars` (`SidecarPlan.todo`) with `request` and write each caption
    file as soon as its image is done, so that a crash loses only the batch in flight. The text
    written is the captioner's output (one caption per line with several captions), joined to the
    existing text for `append`/`prepend`. `on_result` gets each image's final text (written, or in
    a `dry_run` only computed) or its failure, in input order. Returns the counts, without skipped
    images."""
    summary = SidecarSummary(dry_run=dry_run)
    if not dry_run:
        _remove_temporaries(sidecars)
    loop = captioner.loop(request, batch_size=batch_size, workers=num_workers, processes=True, progress=progress)
    results = loop.stream([sidecar.image for sidecar in sidecars])
    for sidecar, (_, captions) in zip(sidecars, results, strict=True):
        outcome = captions if isinstance(captions, ImageLoadError) else _final_text(sidecar, captions, existing)
        if not isinstance(outcome, ImageLoadError) and not dry_run:
            outcome = write_sidecar(sidecar, outcome + "\n")
        if isinstance(outcome, ImageLoadError):
            summary.failed += 1
        else:
            summary.written += 1
        if on_result is not None:
            on_result(sidecar, outcome)
    return summary


def _pair(inputs: Sequence[str], out_dir: Path | None) -> tuple[list[Sidecar], list[tuple[str, str]]]:
    """Each image of `inputs` once (however many inputs reach it), with its caption file."""
    sidecars: dict[object, Sidecar] = {}
    missing: list[tuple[str, str]] = []
    for pattern in inputs:
        if isinstance(as_source(pattern), RemoteShard):  # refused before a hub dataset is downloaded
            raise UserError(f"{pattern}: is a remote input; caption files sit beside local image files only")
        if out_dir is not None and not os.path.isdir(pattern):
            raise UserError(
                f"{pattern}: is not a folder; --sidecar-dir mirrors input folders (use --sidecar for files and globs)"
            )
        images, problems = expand_inputs([pattern], within_tree=True)
        missing += problems
        for image in images:
            if not isinstance(image, LocalPath) or is_shard(image):  # a shard, a dataset file's rows
                raise UserError(
                    f"{image}: is not an image file that a caption file can sit beside; caption it with --output"
                )
            if out_dir is None:
                target = Path(image).with_suffix(CAPTION_SUFFIX)
                tree = pattern if os.path.isdir(pattern) else os.path.dirname(image)
            else:
                target = (out_dir / os.path.relpath(image, pattern)).with_suffix(CAPTION_SUFFIX)
                tree = str(out_dir)
            sidecar = Sidecar(image, target, os.path.realpath(tree or os.curdir))
            sidecars.setdefault(file_identity(image) or image, sidecar)
    return list(sidecars.values()), missing


def _check_unique(sidecars: Sequence[Sidecar]) -> None:
    """Trainers pair an image with the caption file of the same name, so two images that share one
    (`dog.jpg`, `dog.png`) cannot both be captioned; nor may a caption file be one of the inputs."""
    owners: dict[str, LocalPath] = {}
    inputs = {file_identity(sidecar.image) for sidecar in sidecars}
    for sidecar in sidecars:
        key = os.path.normcase(os.path.abspath(sidecar.path))
        if (other := owners.setdefault(key, sidecar.image)) != sidecar.image:
            raise UserError(
                f"{printable(sidecar.image)}: shares the caption file {printable(str(sidecar.path))} with "
                f"{printable(other)}; rename one of them"
            )
        if sidecar.path.exists() and file_identity(str(sidecar.path)) in inputs:
            raise UserError(f"{printable(str(sidecar.path))}: is also an input; writing it would destroy that input")


def _check_writable(sidecars: Sequence[Sidecar]) -> None:
    """Fail before the model loads when a caption file could not be created (a read-only image
    folder: use --sidecar-dir). Folders still to be made are checked at their nearest existing parent."""
    folders = {sidecar.path.parent for sidecar in sidecars}
    for folder in sorted({_existing_ancestor(folder) for folder in folders}):
        if not folder.is_dir():
            raise UserError(f"{folder}: is not a folder; cannot write caption files below it")
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise UserError(
                f"{folder}: cannot create caption files here ({error.strerror or error}); "
                "--sidecar-dir OUT writes them to another folder"
            ) from None


def _existing_ancestor(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _existing_file(sidecar: Sidecar, existing: str) -> tuple[bool, str | None]:
    """(whether the caption file exists, why it cannot be used under the `existing` policy or None)."""
    try:
        status = os.lstat(sidecar.path)
    except FileNotFoundError:
        return False, None
    except OSError as error:
        return False, f"cannot examine {sidecar.path} ({error.strerror or error})"
    if stat.S_ISLNK(status.st_mode):  # replaced, never written through; its target's text is not ours to read
        joins = existing in ("append", "prepend")
        return (
            True,
            f"cannot {existing} to {sidecar.path} (a link; only a regular file's text is joined)" if joins else None,
        )
    if not stat.S_ISREG(status.st_mode):
        return True, f"{sidecar.path} is not a regular file"
    if existing != "skip" and not status.st_mode & stat.S_IWUSR:
        return True, f"{sidecar.path} is read-only; not replaced"
    if existing in ("append", "prepend") and status.st_size > MAX_CAPTION_FILE_BYTES:
        return True, f"cannot {existing} to {sidecar.path} (over {MAX_CAPTION_FILE_BYTES:,} bytes: not a caption file?)"
    return True, None


def _final_text(sidecar: Sidecar, captions: list[str], existing: str) -> str | ImageLoadError:
    """The caption file's new text, or why it cannot be made (an existing file that is not text)."""
    text = "\n".join(captions)
    if existing not in ("append", "prepend"):
        return text
    try:
        data = read_regular(sidecar.path, MAX_CAPTION_FILE_BYTES, follow_links=False)
        # utf-8-sig: files saved by Windows editors start with a byte-order mark that is not text
        old = data.decode("utf-8-sig").strip()
    except FileNotFoundError:
        return text
    except (OSError, UnicodeDecodeError) as error:  # a link, a special file, over the cap
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else (error.strerror or str(error))
        return ImageLoadError(sidecar.image, f"cannot {existing} to {sidecar.path} ({reason})")
    if not old:
        return text
    return f"{old}{SEPARATOR}{text}" if existing == "append" else f"{text}{SEPARATOR}{old}"


def write_sidecar(sidecar: Sidecar, text: str) -> None | ImageLoadError:
    """Write the caption file atomically, keeping an existing file's mode; refused (as the image's
    failure) when its folder is not inside the sidecar's tree, e.g. after a folder was swapped for a link."""
    folder = os.path.realpath(sidecar.path.parent)
    if not is_within(folder, sidecar.tree):
        return ImageLoadError(sidecar.image, f"{sidecar.path} would be written outside {sidecar.tree}; not written")
    try:
        status = os.lstat(sidecar.path)
        mode = stat.S_IMODE(status.st_mode) if stat.S_ISREG(status.st_mode) else None
    except FileNotFoundError:
        mode = None
    with write_errors(sidecar.path):
        write_atomic(sidecar.path, text, mode=mode)
    return None


def _remove_temporaries(sidecars: Sequence[Sidecar]) -> None:
    """Delete the temporaries a killed run left beside the caption files it was writing: only
    names of the form `atomic_path` gives to the caption files of this job."""
    names: dict[Path, set[str]] = {}
    for sidecar in sidecars:
        names.setdefault(sidecar.path.parent, set()).add(sidecar.path.name)
    for folder, ours in names.items():
        for entry in _entries(folder):
            match = _TEMPORARY.match(entry.name)
            if match and match["name"] in ours and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)


def _entries(folder: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as listing:
            yield from listing
    except OSError:
        return  # a folder not made yet holds no temporaries
