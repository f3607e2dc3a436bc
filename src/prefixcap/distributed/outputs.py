"""Results: one record per image, written as text, JSON lines, CSV or Parquet, and part files.

A part file holds the results of one `Part` as JSON lines, good images exactly as the `jsonl`
format writes them and unreadable ones as `{"path", "error"}`. It is written to a temporary
name and renamed, so it exists only once complete: its existence is what "finished" means.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prefixcap.atomic import atomic_file

FORMATS = ("text", "jsonl", "csv", "parquet")
SUFFIXES = {"text": ".txt", "jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
_PARQUET_ROWS = 10_000  # rows per Parquet row group


@dataclass
class Result:
    path: str  # image file, or "shard#member" for an image inside a WebDataset shard
    captions: list[str] | None = None  # the captions, best first; None if the image failed
    error: str | None = None  # why the image could not be read (without the path)

    def to_json(self) -> str:
        if self.captions is None:
            return json.dumps({"path": self.path, "error": self.error})
        return json.dumps({"path": self.path, "caption": self.captions[0], "captions": self.captions})

    @classmethod
    def from_json(cls, line: str) -> Result:
        record = json.loads(line)
        return cls(record["path"], record.get("captions"), record.get("error"))


class RecordWriter:
    """Writes the captions of good images in one of FORMATS. Text formats are flushed record by
    record, so a crash loses nothing written; Parquet is written in row groups."""

    def __init__(self, out: IO, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        self.out, self.fmt = out, fmt
        self.csv = csv.writer(out) if fmt == "csv" else None
        self.header_written = False
        self.rows: list[dict] = []  # Parquet rows not yet written
        self.parquet = None

    def write(self, path: str, captions: list[str]) -> None:
        if self.fmt == "parquet":
            self.rows.append({"path": path, "caption": captions[0], "captions": captions})
            if len(self.rows) == _PARQUET_ROWS:
                self._write_row_group()
            return
        if self.fmt == "text":
            self.out.write("\t".join([path, *captions]) + "\n")
        elif self.fmt == "jsonl":
            self.out.write(Result(path, captions).to_json() + "\n")
        else:
            if not self.header_written:
                self.csv.writerow(["path", "caption", *[f"caption_{i + 2}" for i in range(len(captions) - 1)]])
                self.header_written = True
            self.csv.writerow([path, *captions])
        self.out.flush()

    def close(self) -> None:
        """Finish the file (Parquet needs its footer); the caller closes `out`."""
        if self.fmt == "parquet":
            self._write_row_group()
            self.parquet.close()

    def _write_row_group(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("path", pa.string()), ("caption", pa.string()), ("captions", pa.list_(pa.string()))])
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.out, schema)
        if self.rows:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=schema))
        self.rows = []


def open_output(path: str | Path, fmt: str) -> IO:
    """`path` opened for a RecordWriter: binary for Parquet, text otherwise."""
    if fmt == "parquet":
        return open(path, "wb")
    return open(path, "w", newline="", encoding="utf-8")


def write_part(path: Path, results: Iterable[Result]) -> None:
    """Write a part file atomically: it appears complete or not at all."""
    with atomic_file(path) as out:
        out.writelines(result.to_json() + "\n" for result in results)


def read_part(path: Path) -> Iterator[Result]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            yield Result.from_json(line)
