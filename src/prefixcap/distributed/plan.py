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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Remote or piped WebDataset shards ("https://host/shard-000.tar", "pipe:aws s3 cp ... -").
_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def is_remote(source: str) -> bool:
    """Whether `source` is a URL or a `pipe:` command rather than a local path."""
    return bool(_URL.match(source))


def is_shard(source: str) -> bool:
    """Whether `source` names a WebDataset shard (a local or remote tar file, or a `pipe:` command)."""
    return is_remote(source) or source.lower().endswith(SHARD_SUFFIXES)


@dataclass(frozen=True)
class Part:
    index: int  # position in the plan; results are merged in this order
    sources: tuple[str, ...]  # image files, or the spec of one WebDataset shard
    fingerprint: str  # hash of the sources and settings: a part file with this name is this part

    @property
    def is_shard(self) -> bool:
        return len(self.sources) == 1 and is_shard(self.sources[0])

    @property
    def filename(self) -> str:
        return f"part-{self.index:06d}-{self.fingerprint}.jsonl"


def plan_parts(sources: Sequence[str], *, part_size: int, settings: dict[str, Any] | None = None) -> list[Part]:
    """Cut `sources` (image files and shard specs, in input order) into parts.

    `settings` (model, decoding options, ...) enter every fingerprint, so that results made with
    other settings are never reused.
    """
    if part_size < 1:
        raise ValueError("part_size must be >= 1")
    salt = json.dumps(settings or {}, sort_keys=True, default=str)
    groups: list[list[str]] = []
    for source in sources:
        if is_shard(source) or not groups or is_shard(groups[-1][0]) or len(groups[-1]) == part_size:
            groups.append([])
        groups[-1].append(source)
    return [Part(index, tuple(group), _fingerprint(salt, group)) for index, group in enumerate(groups)]


def _fingerprint(salt: str, sources: list[str]) -> str:
    digest = hashlib.sha256(salt.encode())
    for source in sources:
        digest.update(b"\0" + source.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:12]
