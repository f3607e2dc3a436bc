"""Results: one record per image, written as text, JSON lines, CSV or Parquet, and part files.

A part file holds the results of one `Part` as JSON lines, good images exactly as the `jsonl`
format writes them and unreadable ones as `{"path", "error"}`. It is written to a temporary
name and renamed, so it exists only once complete: its existence is what "finished" means.

File names may hold bytes that are not UTF-8 (Python keeps them as surrogate escapes). JSON lines
write them as `\\udcNN` escapes, and text, CSV and Parquet write the same escapes as plain text,
so every format is valid UTF-8. The text format also escapes backslash, tab, newline and carriage
return (`\\\\`, `\\t`, `\\n`, `\\r`), so that each record is exactly one `path<TAB>caption` line.

Parquet with `embed_images` also stores each image's encoded bytes, read again from its source, in
an `image` column of `{bytes, path}` structs marked as the `datasets` Image feature, so that
`datasets.load_dataset("parquet", data_files=...)` loads an image-text dataset. Part files never
hold image bytes: a folder job embeds them when it merges the parts.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.hf_datasets import reference_file
from prefixcap.inputs.sources import file_identity, read_image_bytes
from prefixcap.system.atomic import atomic_file, atomic_path
from prefixcap.system.extras import require
from prefixcap.system.terminal import for_terminal, is_terminal

FORMATS = ("text", "jsonl", "csv", "parquet")
SUFFIXES = {"text": ".txt", "jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
_PARQUET_ROWS = 10_000  # rows per Parquet row group
_PARQUET_IMAGE_ROWS = 100  # with embedded images, as the `datasets` library writes them
# The `datasets` feature of the `image` column, in the schema metadata where `datasets` looks for it.
_HF_FEATURES = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


@dataclass
class Result:
    path: str  # image file, or "shard#member" for an image inside a WebDataset shard
    captions: list[str] | None = None  # the captions, best first; None if the image failed
    error: str | None = None  # why the image could not be read (without the path)
    scores: list[float] | None = None  # the reranker's score of each caption, when reranked
    # the datastore captions its prompt was made of, [{"caption", "score"}, ...] best first, when shown
    retrieved: list[dict] | None = None

    def to_json(self) -> str:
        if self.captions is None:
            return json.dumps({"path": self.path, "error": self.error})
        record = {"path": self.path, "caption": self.captions[0], "captions": list(self.captions)}
        if self.scores is not None:
            record["scores"] = self.scores
        if self.retrieved is not None:
            record["retrieved"] = self.retrieved
        return json.dumps(record)

    @classmethod
    def from_json(cls, line: str) -> Result:
        record = json.loads(line)
        return cls(
            record["path"], record.get("captions"), record.get("error"), record.get("scores"), record.get("retrieved")
        )

    @classmethod
    def of(cls, path: str, outcome: list[str] | ImageLoadError) -> Result:
        """The record of one image that the caption loop gave captions or a failure;
        reranked captions (`RankedCaptions`) bring their scores, and `RetrievedCaptions` what
        their image retrieved."""
        if isinstance(outcome, ImageLoadError):
            return cls(path, error=outcome.reason)
        retrieved = getattr(outcome, "retrieved", None)
        if retrieved is not None and not isinstance(retrieved, list):  # a list: read back from a part file
            from prefixcap.retrieval.inference import retrieved_json  # not at import, as `ranked`

            retrieved = retrieved_json(retrieved)
        return cls(path, list(outcome), scores=getattr(outcome, "scores", None), retrieved=retrieved)

    @property
    def ranked(self) -> list[str]:
        """The captions as a captioner gave them: with their scores (`RankedCaptions`) when
        reranked, and what was retrieved (`RetrievedCaptions`) when shown."""
        from prefixcap.pipeline.loop import RankedCaptions, RetrievedCaptions  # not at import: --help loads no torch

        if self.retrieved is not None:
            return RetrievedCaptions(self.captions, self.retrieved, self.scores)
        return self.captions if self.scores is None else RankedCaptions(self.captions, self.scores)


def require_format(fmt: str) -> None:
    """Fail, naming the extra to install, when writing `fmt` needs a package that is missing."""
    if fmt == "parquet":
        require("scale", "pyarrow", feature="parquet output")


class RecordWriter:
    """Writes the captions of good images in one of FORMATS to `out`, which `name` names in errors.
    Reranked captions (`RankedCaptions`) also write their scores in JSON lines, as `scores`.
    Text formats are flushed record by record, so a crash loses nothing written; Parquet is
    written in row groups. Parquet columns: `path`, `caption` (the first caption), `captions`, and
    with `embed_images` first an `image` column: the `datasets` Image struct `{bytes, path}`."""

    def __init__(self, out: IO, fmt: str, name: str, *, embed_images: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        if embed_images and fmt != "parquet":
            raise ValueError("only parquet output can embed images")
        require_format(fmt)
        self.out, self.fmt, self.name, self.embed_images = out, fmt, name, embed_images
        # text records shown on a terminal have their control characters escaped (`for_terminal`)
        self.field = for_terminal if fmt == "text" and is_terminal(out) else printable
        self.csv = csv.writer(out) if fmt == "csv" else None
        self.header_written = False
        self.rows: list[dict] = []  # Parquet rows not yet written
        self.parquet = None

    def write(self, path: str, captions: list[str]) -> None:
        with write_errors(self.name):
            self._write(path, captions)

    def close(self) -> None:
        """Finish the file (Parquet needs its footer) and flush it, so that a full disk shows up
        here as a UserError; the caller closes `out`."""
        with write_errors(self.name):
            if self.fmt == "parquet":
                self._write_row_group()
                self.parquet.close()
            self.out.flush()

    def _write(self, path: str, captions: list[str]) -> None:
        if self.fmt == "jsonl":
            self.out.write(Result.of(path, captions).to_json() + "\n")
        elif self.fmt == "text":
            self.out.write("\t".join(self.field(field.translate(_TEXT_ESCAPES)) for field in [path, *captions]) + "\n")
        elif self.fmt == "csv":
            if not self.header_written:
                self.csv.writerow(["path", "caption", *[f"caption_{i + 2}" for i in range(len(captions) - 1)]])
                self.header_written = True
            self.csv.writerow([printable(path), *captions])
        else:
            row = {"path": printable(path), "caption": captions[0], "captions": captions}
            if self.embed_images:
                row["image"] = {"bytes": self._image_bytes(path), "path": printable(path)}
            self.rows.append(row)
            if len(self.rows) == (_PARQUET_IMAGE_ROWS if self.embed_images else _PARQUET_ROWS):
                self._write_row_group()
            return
        self.out.flush()

    def _write_row_group(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = [("path", pa.string()), ("caption", pa.string()), ("captions", pa.list_(pa.string()))]
        schema = pa.schema(fields)
        if self.embed_images:
            image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            schema = pa.schema([("image", image), *fields], metadata=_HF_FEATURES)
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.out, schema)
        if self.rows:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=schema))
        self.rows = []

    def _image_bytes(self, path: str) -> bytes:
        """The encoded image that `path` (a file, a local shard member or a Parquet row) names, read again."""
        try:
            return read_image_bytes(path)
        except ImageLoadError as error:
            raise UserError(f"{self.name}: cannot embed image {error}") from None


def printable(name: str) -> str:
    """`name` as valid UTF-8: the surrogate escapes that stand for undecodable bytes in file names
    become the text `\\udcNN`, as JSON writes them."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


@contextmanager
def write_errors(name: str | Path) -> Iterator[None]:
    """Turn an OSError while writing `name` (disk full, read-only, quota) into one line."""
    try:
        yield
    except OSError as error:
        raise UserError(f"{name}: cannot write ({error.strerror or error})") from None


def is_stream(path: str | Path) -> bool:
    """Whether `path` is a device or FIFO (`/dev/stdout`): written in place, not replaced."""
    return Path(path).exists() and not Path(path).is_file()


def check_output(targets: Sequence[Path], inputs: Iterable[str]) -> None:
    """Fail before any work when an output could not be written (missing or read-only folder),
    or would replace one of the `inputs` (compared as files, so links and other spellings count)."""
    for folder in {target.resolve().parent for target in targets if not is_stream(target)}:
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise UserError(f"{folder}: cannot create files here ({error.strerror or error})") from None
    existing = {file_identity(target): target for target in targets if target.exists()}
    if not existing:  # nothing to overwrite: spare a stat of every input
        return
    for source in inputs:
        if (target := existing.get(file_identity(reference_file(source)))) is not None:
            raise UserError(f"{target}: is also an input; writing it would destroy that input")


@contextmanager
def open_output(path: str | Path, fmt: str) -> Iterator[IO]:
    """`path` opened for a RecordWriter: binary for Parquet, text otherwise. A file is written to
    a temporary beside it and renamed once complete, so an error or Ctrl-C leaves no partial file
    (and an older file as it was); a device or FIFO is written in place. Failing to open or close
    it (a full disk shows when the last buffer is written) is a UserError."""
    with nullcontext(path) if is_stream(path) else atomic_path(Path(path).resolve()) as target:
        with write_errors(path):
            out = open(target, "wb") if fmt == "parquet" else open(target, "w", newline="", encoding="utf-8")
        try:
            yield out
        finally:
            with write_errors(path):
                out.close()


def write_part(path: Path, results: Iterable[Result]) -> None:
    """Write a part file atomically: it appears complete or not at all."""
    with write_errors(path), atomic_file(path) as out:
        out.writelines(result.to_json() + "\n" for result in results)


def read_part(path: Path) -> Iterator[Result]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            yield Result.from_json(line)
