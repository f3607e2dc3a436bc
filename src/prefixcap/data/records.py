"""The one record type every dataset format is read into, and the checks shared by the readers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prefixcap.errors import UserError

SPLITS = ("train", "val", "test")
# Other names datasets use for the same three splits (Karpathy's `restval` is extra training data).
_SPLIT_ALIASES = {"restval": "train", "validation": "val", "valid": "val", "dev": "val"}


@dataclass(frozen=True)
class CaptionRecord:
    image_id: str  # stable, unique id: the dataset's own id, else the image path relative to its root
    image: str  # image file path, or "path/to/shard.tar#key.jpg" for a WebDataset member
    captions: tuple[str, ...]  # every reference caption of the image, in file order
    split: str  # "train", "val" or "test"


def split_records(records: Iterable[CaptionRecord], split: str) -> list[CaptionRecord]:
    """The records of one split, in their original order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [record for record in records if record.split == split]


def split_name(value: str) -> str | None:
    """`value` as one of SPLITS (aliases such as `restval` or `validation` folded in), or None."""
    name = value.strip().lower()
    name = _SPLIT_ALIASES.get(name, name)
    return name if name in SPLITS else None


def parse_split(value: Any, where: str) -> str:
    """Like `split_name`, but a value that names no split is the user's error, reported at `where`."""
    split = split_name(value) if isinstance(value, str) else None
    if split is None:
        raise UserError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return split


def parse_caption(value: Any, where: str) -> str:
    """A caption stripped of surrounding whitespace; anything but a non-empty string is an error."""
    if not isinstance(value, str):
        raise UserError(f"{where}: caption must be a string, not {type(value).__name__}")
    caption = value.strip()
    if not caption:
        raise UserError(f"{where}: caption is empty")
    return caption


class RecordMerger:
    """Collects captions per image in first-seen order, for formats with one row per caption.

    Rows that name the same image are merged into one record; they must agree on its split and id.
    """

    def __init__(self) -> None:
        self._records: dict[str, CaptionRecord] = {}  # image -> record so far, in insertion order

    def add(self, image: str, image_id: str, captions: Iterable[str], split: str, where: str) -> None:
        captions = tuple(captions)
        previous = self._records.get(image)
        if previous is None:
            self._records[image] = CaptionRecord(image_id, image, captions, split)
            return
        if previous.split != split:
            raise UserError(f"{where}: image {image} was given split {previous.split!r} before, now {split!r}")
        if previous.image_id != image_id:
            raise UserError(f"{where}: image {image} was given image_id {previous.image_id!r} before, now {image_id!r}")
        self._records[image] = CaptionRecord(image_id, image, previous.captions + captions, split)

    def records(self) -> list[CaptionRecord]:
        return list(self._records.values())
