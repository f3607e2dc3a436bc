"""The work plan: the inputs cut into parts, the unit that is split across processes and resumed.

Every process computes the same plan from the same inputs, so processes never need to agree on
anything but which parts are already finished. Image files are cut, in input order, into parts of
`part_size` images; each WebDataset shard is one part of its own (it is read as one stream, and
shards are usually sized like parts already). A part is named by its position and a hash of its
images and the captioning settings, so a rerun recognises finished parts, and a rerun with other
inputs or settings cannot mistake an old part for one of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Remote or piped WebDataset shards ("https://host/shard-000.tar", "pipe:aws s3 cp ... -").
_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


class LocalPath(str):
    """A file to open as a file, whatever its name looks like. Names found on disk (folder walks,
    glob matches) are always this: a file named `pipe:rm -rf ~;.jpg` must never reach a shell."""


class RemoteShard(str):
    """A WebDataset shard URL or `pipe:` command, as the user typed it: the only kind of input
    that webdataset's URL and pipe openers ever see."""


Source = LocalPath | RemoteShard


def as_source(name: str) -> Source:
    """Decide, once, how a name is opened. Typed names keep their kind; a plain string counts as
    typed by the user (a command-line argument, a string passed to this API), so it is a URL or
    `pipe:` command only when it looks like one and no file or folder has that name."""
    if isinstance(name, (LocalPath, RemoteShard)):
        return name
    return RemoteShard(name) if _URL.match(name) and not os.path.lexists(name) else LocalPath(name)


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file `path` names through any links, or None if there is none:
    two names of one file (a link, `./a.jpg` and `a.jpg`) compare equal."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # missing, unreadable, or a name with a NUL byte
        return None
    return status.st_dev, status.st_ino


def is_shard(source: str) -> bool:
    """Whether `source` names a WebDataset shard: a remote shard, or a local tar file."""
    source = as_source(source)
    return isinstance(source, RemoteShard) or source.lower().endswith(SHARD_SUFFIXES)


@dataclass(frozen=True)
class Part:
    index: int  # position in the plan; results are merged in this order
    sources: tuple[Source, ...]  # image files, or one WebDataset shard
    fingerprint: str  # hash of the sources and settings: a part file with this name is this part

    @property
    def is_shard(self) -> bool:
        return len(self.sources) == 1 and is_shard(self.sources[0])

    @property
    def filename(self) -> str:
        return f"part-{self.index:06d}-{self.fingerprint}.jsonl"


def plan_parts(sources: Sequence[str], *, part_size: int, settings: dict[str, Any] | None = None) -> list[Part]:
    """Cut `sources` (image files and shard specs, in input order; plain strings are read with
    `as_source`) into parts.

    `settings` (model, decoding options, ...) enter every fingerprint, so that results made with
    other settings are never reused.
    """
    if part_size < 1:
        raise ValueError("part_size must be >= 1")
    salt = json.dumps(settings or {}, sort_keys=True, default=str)
    groups: list[list[Source]] = []
    for source in map(as_source, sources):
        if is_shard(source) or not groups or is_shard(groups[-1][0]) or len(groups[-1]) == part_size:
            groups.append([])
        groups[-1].append(source)
    return [Part(index, tuple(group), _fingerprint(salt, group)) for index, group in enumerate(groups)]


def _fingerprint(salt: str, sources: list[Source]) -> str:
    digest = hashlib.sha256(salt.encode())
    for source in sources:  # the kind too: a file named like a URL is not that URL
        digest.update(f"\0{type(source).__name__}:".encode() + source.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:12]
