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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefixcap.inputs.sources import Source, as_source, is_shard
from prefixcap.pipeline.loop import group


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
    units = group(map(as_source, sources), part_size)
    return [Part(index, tuple(unit), _fingerprint(salt, unit)) for index, unit in enumerate(units)]


def _fingerprint(salt: str, sources: list[Source]) -> str:
    digest = hashlib.sha256(salt.encode())
    for source in sources:  # the kind too: a file named like a URL is not that URL
        digest.update(f"\0{type(source).__name__}:".encode() + source.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:12]
