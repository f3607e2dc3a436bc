"""The one record type every dataset format is read into, and the checks shared by the readers."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from prefixcap.errors import UserError
from prefixcap.options import MAX_TEXT_CHARS, clean_prompt

SPLITS = ("train", "val", "test")
# Other names datasets use for the same three splits (Karpathy's `restval` is extra training data).
_SPLIT_ALIASES = {"restval": "train", "validation": "val", "valid": "val", "dev": "val"}


@dataclass(frozen=True)
class CaptionRecord:
    image_id: str  # stable, unique id: the dataset's own id, else the image path relative to its root
    image: str  # image file path, or "path/to/shard.tar#key.jpg" for a WebDataset member
    captions: tuple[str, ...]  # every reference caption of the image, in file order
    split: str  # "train", "val" or "test"
    # text the captions continue (training conditions on image + prompt and learns the captions only)
    prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON values; without `prompt` when it has none, so that feature stores of
        prompt-less datasets keep the files (and fingerprints) they had before prompts existed."""
        values = asdict(self)
        if self.prompt is None:
            del values["prompt"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionRecord:
        return cls(
            values["image_id"], values["image"], tuple(values["captions"]), values["split"], values.get("prompt")
        )


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


def parse_prompt(value: Any, where: str) -> str | None:
    """A record's prompt, whitespace-normalised (`clean_prompt`, as at inference); an empty one
    (or JSON null) is none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: prompt must be a string, not {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise UserError(f"{where}: prompt is over {MAX_TEXT_CHARS} characters")
    return clean_prompt(value) or None


class RecordMerger:
    """Collects captions per image in first-seen order, for formats with one row per caption.

    Rows that name the same image are merged into one record; they must agree on its split, id and prompt.
    """

    def __init__(self) -> None:
        self._records: dict[str, CaptionRecord] = {}  # image -> record so far, in insertion order

    def add(
        self, image: str, image_id: str, captions: Iterable[str], split: str, where: str, prompt: str | None = None
    ) -> None:
        captions = tuple(captions)
        previous = self._records.get(image)
        if previous is None:
            self._records[image] = CaptionRecord(image_id, image, captions, split, prompt)
            return
        for name, value in (("split", split), ("image_id", image_id), ("prompt", prompt)):
            if getattr(previous, name) != value:
                before = getattr(previous, name)
                raise UserError(f"{where}: image {image} was given {name} {before!r} before, now {value!r}")
        self._records[image] = CaptionRecord(image_id, image, previous.captions + captions, split, prompt)

    def records(self) -> list[CaptionRecord]:
        return list(self._records.values())


def parse_json(text: str, where: str, problem: str = "invalid JSON", *, line: bool = False) -> Any:
    """`text` parsed as JSON, else a one-line UserError "WHERE[:LINE]: PROBLEM (why)"; also for
    JSON nested deeper than Python's parser goes, which raises RecursionError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}{f':{error.lineno}' if line else ''}: {problem} ({error.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: {problem} (nested too deeply)") from None


def json_lines(path: Path, file: IO[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("FILE:LINE", object) for each non-blank line of the JSON-lines `file` read from `path`;
    a line that is not a JSON object is a one-line error naming it."""
    for number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        row = parse_json(line, where)
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def csv_rows(path: Path, file: IO[str]) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
    """The header of the CSV `file` read from `path`, and ("FILE:LINE", row by column) for each of
    its rows; what Python's csv module cannot read (a field over its size limit) is a one-line
    error naming the line."""
    reader = csv.DictReader(file)
    with _csv_errors(path, reader):
        columns = list(reader.fieldnames or [])

    def rows() -> Iterator[tuple[str, dict[str, str]]]:
        with _csv_errors(path, reader):
            for row in reader:
                yield f"{path}:{reader.line_num}", {key: value for key, value in row.items() if key is not None}

    return columns, rows()


@contextmanager
def _csv_errors(path: Path, reader: csv.DictReader) -> Iterator[None]:
    try:
        yield
    except csv.Error as error:
        raise UserError(f"{path}:{reader.line_num + 1}: not valid CSV ({error})") from None  # (the line it failed in)
