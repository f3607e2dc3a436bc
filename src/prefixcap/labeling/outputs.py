"""The caption datasets `label` writes, each in a format `prefixcap prepare` and `train` read as
they are, and each resumable: a rerun reads what is there and labels only the other images.

| format        | --out        | holds                                                                   |
|---------------|--------------|-------------------------------------------------------------------------|
| `jsonl`       | FILE.jsonl   | `{"image", "caption", "teacher", "instruction"[, "split"]}` per line      |
| `imagefolder` | DIR          | DIR/metadata.jsonl: `{"file_name", "text", ...}`; the images are in DIR    |
| `parquet`     | DIR          | DIR/SPLIT-00000.parquet, ...: image bytes, path, caption (as `datasets`)   |
| `sidecar`     | DIR or none  | IMAGE.txt beside each image, or under DIR mirroring the input folders    |

Crash safety. Labels are appended as they arrive, each JSON line with a single write to a file
opened for appending, so a killed run leaves at most a partial last line (the next run cuts it
off: the record it held was never complete) and loses only the requests in flight. The file is
fsynced every second and at the end, so that a power cut loses at most about a second more.
Parquet cannot be appended to: labels go to DIR/pending.jsonl that way, and every
`part_size` labels (and at the end) become one more Parquet file, written whole under a temporary
name and renamed. Sidecar files are each written atomically. A file `label` did not write (a
JSON-lines line without `teacher`, a folder holding other files) is refused, never appended to.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prefixcap.errors import UserError
from prefixcap.evaluation.notices import notice
from prefixcap.inputs.sources import LocalPath, RemoteShard, Source, as_source, is_shard
from prefixcap.jobs.sidecar import plan_sidecars, write_sidecar
from prefixcap.jobs.writers import RecordWriter, check_output, open_output, printable, write_errors
from prefixcap.system.atomic import write_atomic
from prefixcap.system.extras import require

OUTPUT_FORMATS = ("jsonl", "imagefolder", "parquet", "sidecar")
FAILURES_SUFFIX = ".failures.jsonl"  # beside a file output: labels.jsonl -> labels.failures.jsonl
FAILURES_FILE = "label-failures.jsonl"  # inside a folder output
PENDING_FILE = "pending.jsonl"
PART_SIZE = 100  # labels per Parquet file: a row group, as `datasets` writes images
_PART = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})\.parquet$")
_FSYNC_SECONDS = 1.0


@dataclass(frozen=True)
class Label:
    image: str  # as the inputs name it: a file, or `shard.tar#key.jpg`, `data.parquet#row=N`
    is_file: bool
    caption: str
    teacher: str  # the teacher's description (never a credential)
    instruction: str  # the prompt it was given


def image_key(image: str, is_file: bool = True) -> str:
    """One name per image, shared by the inputs and the datasets: absolute for files and for the
    members of local dataset files; a remote shard's member as it is."""
    if is_file:
        return os.path.abspath(image)
    container, _, member = image.rpartition("#")
    if isinstance(as_source(container), RemoteShard):
        return image
    return f"{os.path.abspath(container)}#{member}"


class LabelDataset(Protocol):
    done: set[str]  # `image_key`s of the images labelled already
    failures_path: Path | None  # where the run's failures are listed (None: only on stderr)

    def open(self) -> None:
        """Start writing (nothing is written before: a dry run only reads)."""

    def add(self, label: Label) -> None: ...

    def close(self) -> None:
        """Make everything added durable and complete."""


def open_dataset(
    fmt: str, out: str | None, *, split: str | None, paths: Sequence[str], sources: Sequence[Source]
) -> LabelDataset:
    """The dataset `fmt` writes at `out`, checked against the inputs before any work."""
    if fmt == "sidecar":
        if split is not None:
            raise UserError("--split: sidecar files take their split from the image's folder (train/, val/, test/)")
        return SidecarDataset(paths, None if out is None else Path(out))
    if out is None:
        raise UserError(f"--format {fmt} needs --out")
    if fmt == "jsonl":
        return JsonlDataset(Path(out), split, sources)
    if fmt == "imagefolder":
        return ImagefolderDataset(Path(out), split, sources)
    return ParquetDataset(Path(out), split, sources)


class Journal:
    """JSON records appended to a file, one line each, every line with a single write."""

    def __init__(self, path: Path, *, owner_key: str):
        self.path = path
        self._fd: int | None = None
        self._torn = 0  # bytes after the last newline: a line a killed run did not finish
        self._synced = time.monotonic()
        self.records = self._read(owner_key)

    def _read(self, owner_key: str) -> list[dict[str, Any]]:
        if not os.path.lexists(self.path):
            return []
        if self.path.is_symlink() or not self.path.is_file():
            raise UserError(f"{self.path}: is not a regular file; refusing to write through it")
        with write_errors(self.path):
            data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        self._torn = len(data) - complete
        records = []
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict) or owner_key not in record:
                raise UserError(
                    f"{self.path}:{number}: not a record `prefixcap label` wrote (no {owner_key!r}); "
                    "refusing to add to it: choose a new --out"
                )
            records.append(record)
        return records

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        with write_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, flags, 0o666)
            if self._torn:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - self._torn)
                notice(f"{self.path}: cut off a partial last line that an interrupted run left")
                self._torn = 0

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        with write_errors(self.path):
            while data:  # one write for a line, unless the system writes it in pieces
                data = data[os.write(self._fd, data) :]
            if time.monotonic() - self._synced > _FSYNC_SECONDS:
                self._sync()
        self.records.append(record)

    def clear(self) -> None:
        with write_errors(self.path):
            os.ftruncate(self._fd, 0)
            self._sync()
        self.records = []

    def close(self) -> None:
        if self._fd is not None:
            with write_errors(self.path):
                self._sync()
                os.close(self._fd)
            self._fd = None

    def _sync(self) -> None:
        os.fsync(self._fd)
        self._synced = time.monotonic()


class JsonlDataset:
    """JSON lines as `prepare` reads them; image paths relative to the file's folder."""

    def __init__(self, path: Path, split: str | None, sources: Sequence[Source]):
        check_output([path], sources)
        self.root = path.absolute().parent
        self.journal = Journal(path, owner_key="teacher")
        self.split = split
        self.failures_path = path.with_name(path.name.removesuffix(".jsonl") + FAILURES_SUFFIX)
        self.done = {_record_key(self.root, record.get("image")) for record in self.journal.records}

    def open(self) -> None:
        self.journal.open()

    def add(self, label: Label) -> None:
        record = {"image": _relative(label, self.root), "caption": label.caption}
        record |= {"teacher": label.teacher, "instruction": label.instruction}
        self.journal.append(record | ({"split": self.split} if self.split else {}))

    def close(self) -> None:
        self.journal.close()


class ImagefolderDataset:
    """A Hugging Face imagefolder: DIR/metadata.jsonl naming images inside DIR."""

    def __init__(self, root: Path, split: str | None, sources: Sequence[Source]):
        if (root / "metadata.csv").exists():
            raise UserError(f"{root}: has a metadata.csv; an imagefolder takes one metadata file: choose another --out")
        self.root = root.absolute()
        for source in sources:
            relative = os.path.relpath(os.path.abspath(source), self.root)
            if not isinstance(source, LocalPath) or is_shard(source) or relative.startswith(os.pardir):
                raise UserError(
                    f"{printable(source)}: is not an image file inside {root}; an imagefolder's metadata names "
                    "the images in its folder (use --format jsonl for images elsewhere)"
                )
        metadata = root / "metadata.jsonl"
        check_output([metadata], sources)
        self.journal = Journal(metadata, owner_key="teacher")
        self.split = split
        self.failures_path = root / FAILURES_FILE
        self.done = {_record_key(self.root, record.get("file_name")) for record in self.journal.records}

    def open(self) -> None:
        self.journal.open()

    def add(self, label: Label) -> None:
        record = {"file_name": Path(os.path.relpath(os.path.abspath(label.image), self.root)).as_posix()}
        record |= {"text": label.caption, "teacher": label.teacher, "instruction": label.instruction}
        self.journal.append(record | ({"split": self.split} if self.split else {}))

    def close(self) -> None:
        self.journal.close()


class ParquetDataset:
    """Parquet files as the `datasets` library writes them (the image bytes in an `image` column,
    its Image feature), named by split so that `prepare` reads the split from the name."""

    def __init__(self, root: Path, split: str | None, sources: Sequence[Source], part_size: int | None = None):
        require("scale", "pyarrow", feature="parquet output")
        if remote := next((source for source in sources if isinstance(source, RemoteShard)), None):
            raise UserError(f"{remote}: Parquet output stores the images, read again from their files; not remote ones")
        if root.exists() and not root.is_dir():
            raise UserError(f"{root}: exists and is not a folder; Parquet output goes to a folder")
        self.root, self.split, self.part_size = root, split or "train", part_size or PART_SIZE
        names = sorted(entry.name for entry in root.iterdir()) if root.is_dir() else []
        foreign = [
            name
            for name in names
            if not (_PART.match(name) or name in (PENDING_FILE, FAILURES_FILE) or name.startswith("."))
        ]
        if foreign:
            raise UserError(
                f"{root}: holds {foreign[0]!r}, which `prefixcap label` did not write; refusing to write into it "
                "(choose a new or empty folder)"
            )
        self.parts = [root / name for name in names if _PART.match(name)]
        self.journal = Journal(root / PENDING_FILE, owner_key="teacher")
        self.failures_path = root / FAILURES_FILE
        stored = self._stored()
        self._stale = any(record.get("image") in stored for record in self.journal.records)
        self.done = stored | {record.get("image") for record in self.journal.records}

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.journal.open()
        if self._stale:  # a run stopped between writing a part and clearing the pending labels it holds
            self._write_part()

    def add(self, label: Label) -> None:
        record = {"image": image_key(label.image, label.is_file), "caption": label.caption}
        self.journal.append(record | {"teacher": label.teacher, "instruction": label.instruction})
        if len(self.journal.records) >= self.part_size:
            self._write_part()

    def close(self) -> None:
        if self.journal.records:
            self._write_part()
        self.journal.close()

    def _stored(self) -> set[str]:
        """The images in the Parquet files (their `path` column: the `image_key` they were labelled by)."""
        import pyarrow.parquet as pq

        with write_errors(self.root):
            return {path for part in self.parts for path in pq.read_table(part, columns=["path"])["path"].to_pylist()}

    def _write_part(self) -> None:
        """The pending labels as one more Parquet file (those already in a part left out), then
        an empty journal; a crash in between leaves labels in both, which `open` sorts out."""
        stored = self._stored()
        records = [record for record in self.journal.records if record["image"] not in stored]
        if records:
            index = 1 + max((int(_PART.match(part.name)["index"]) for part in self.parts), default=-1)
            target = self.root / f"{self.split}-{index:05d}.parquet"
            with open_output(target, "parquet") as out:
                writer = RecordWriter(out, "parquet", str(target), embed_images=True)
                for record in records:
                    writer.write(record["image"], [record["caption"]])
                writer.close()
            self.parts.append(target)
        self.journal.clear()


class SidecarDataset:
    """One IMAGE.txt per image (`prefixcap.jobs.sidecar`): an image whose file exists is labelled."""

    def __init__(self, paths: Sequence[str], out_dir: Path | None):
        plan = plan_sidecars(paths, out_dir=out_dir, existing="skip")
        self.done = {image_key(sidecar.image) for sidecar in plan.skipped}
        self.targets = {image_key(sidecar.image): sidecar for sidecar in plan.todo}
        # images whose caption file cannot be written (a folder of that name, ...), with the reason
        self.refused = {image_key(sidecar.image): failure for sidecar, failure in plan.refused}
        self.failures_path = None if out_dir is None else out_dir / FAILURES_FILE

    def open(self) -> None:
        pass

    def add(self, label: Label) -> None:
        key = image_key(label.image)
        if key in self.refused:
            raise UserError(str(self.refused[key]))
        failure = write_sidecar(self.targets[key], label.caption + "\n")
        if failure is not None:
            raise UserError(str(failure))

    def close(self) -> None:
        pass


def write_failures(path: Path | None, failures: Sequence[dict[str, Any]]) -> None:
    """This run's failures, one JSON object a line, written whole; none removes an old list."""
    if path is None:
        return
    with write_errors(path):
        if failures:
            write_atomic(path, "".join(json.dumps(failure) + "\n" for failure in failures))
        elif path.is_file() and not path.is_symlink():
            path.unlink()


def _relative(label: Label, root: Path) -> str:
    """A label's image as a dataset record names it: relative to the dataset's folder when local."""
    if label.is_file:
        return Path(os.path.relpath(os.path.abspath(label.image), root)).as_posix()
    container, _, member = label.image.rpartition("#")
    if isinstance(as_source(container), RemoteShard):
        return label.image
    return f"{Path(os.path.relpath(os.path.abspath(container), root)).as_posix()}#{member}"


def _record_key(root: Path, image: Any) -> str:
    """The `image_key` of a record's image, named relative to `root` (or a remote shard's member)."""
    if not isinstance(image, str):
        return ""
    container, hash_sign, member = image.rpartition("#")
    if hash_sign and isinstance(as_source(container), RemoteShard):
        return image
    return os.path.abspath(os.path.join(root, image))
