"""Hugging Face dataset layouts as image inputs: hub dataset ids (`hf://datasets/OWNER/NAME[@rev]`),
imagefolder and Parquet detection, and images stored in Parquet files.

An image stored inside a Parquet file is referenced as `data.parquet#row=12` (the row of the
file, counted from 0), or `data.parquet#row=12&column=img` when its column is not `image`; such a
reference is read by `read_parquet_image`, a local file read like a tar member's. Paths found in
the data are only ever opened as local files, never as URLs or commands. The readers that turn
these datasets into caption records are `prefixcap.data.hf`'s.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from prefixcap.errors import UserError
from prefixcap.inputs.images import IMAGE_EXTENSIONS, read_image_file
from prefixcap.system.extras import require

IMAGE_COLUMNS = ("image", "img", "file_name")  # tried in this order when no --image-column is given
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
HUB_PREFIX = "hf://datasets/"
_DEFAULT_IMAGE_COLUMN = "image"  # the column a `#row=N` reference names when it names none
_ROW_REFERENCE = re.compile(r"^(?P<file>.+\.parquet)#row=(?P<row>\d+)(?:&column=(?P<column>.+))?$")
_HUB_ID = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?$")


def is_hub_dataset(name: str) -> bool:
    """Whether `name` is a hub dataset id, `hf://datasets/OWNER/NAME[@rev][/folder]`."""
    return name.startswith(HUB_PREFIX)


def dataset_kind(path: str | Path) -> str | None:
    """`imagefolder` for a folder with `metadata.jsonl`/`.csv` files, `parquet` for a Parquet file
    or a folder holding some (directly, in split folders or in `data/`), else None."""
    location = Path(path)
    if location.is_file():
        return "parquet" if location.suffix.lower() == ".parquet" else None
    if not location.is_dir():
        return None
    if metadata_files(location):
        return "imagefolder"
    return "parquet" if parquet_files(location) else None


def metadata_files(folder: Path) -> list[Path]:
    """The imagefolder metadata files of `folder` and of its split folders, sorted."""
    found = [folder / name for name in METADATA_FILES] + sorted(
        path for name in METADATA_FILES for path in folder.glob(f"*/{name}") if not path.parent.name.startswith(".")
    )
    return [path for path in found if path.is_file()]


def parquet_files(path: Path) -> list[Path]:
    """A Parquet file itself, or the Parquet files of a folder, sorted: at most three folders deep,
    as the hub lays them out (`data/train-00000-of-00002.parquet`, `CONFIG/SPLIT/0000.parquet`),
    so that telling a large image folder's format does not walk all of it. Hidden ones are skipped."""
    if path.is_file():
        return [path]
    found = [file for depth in range(4) for file in path.glob("*/" * depth + "*.parquet")]
    return sorted(
        file for file in found if file.is_file() and not any(p.startswith(".") for p in file.relative_to(path).parts)
    )


def resolve_hub_dataset(name: str) -> Path:
    """The local folder (or file) of a hub dataset id, downloaded with `huggingface_hub` (cached;
    `HF_HUB_OFFLINE=1` uses the cache only). Only Parquet files, imagefolder metadata and images
    are fetched; a `/folder` after the id fetches that part of the repository only."""
    match = _HUB_ID.match(name)
    if match is None:
        raise UserError(f"{name}: expected hf://datasets/OWNER/NAME[@REVISION][/FOLDER]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    subpath = (match["path"] or "").strip("/")
    patterns = ["*.parquet", *(f"*{file}" for file in METADATA_FILES), *(f"*{ext}" for ext in IMAGE_EXTENSIONS)]
    if subpath:
        patterns = [f"{subpath}/{pattern}" for pattern in patterns] + [subpath]
    revision = unquote(match["revision"]) if match["revision"] else None  # refs%2Fconvert%2Fparquet
    try:
        folder = snapshot_download(match["repo"], repo_type="dataset", revision=revision, allow_patterns=patterns)
    except (HfHubHTTPError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{name}: cannot download this dataset ({reason})") from None
    location = Path(folder, subpath) if subpath else Path(folder)
    if not location.exists():
        raise UserError(f"{name}: the dataset has no {subpath!r}")
    return location


def pick_column(columns: Sequence[str], chosen: str | None, defaults: Sequence[str], what: str, source: str) -> str:
    """`chosen` if `columns` has it, else the first of `defaults` it has; else one line listing them."""
    if chosen is not None:
        if chosen not in columns:
            raise UserError(f"{source}: no {what} column {chosen!r} (columns: {', '.join(columns)})")
        return chosen
    for name in defaults:
        if name in columns:
            return name
    flag = f"--{what}-column"
    raise UserError(
        f"{source}: no {what} column among {', '.join(defaults)}; pick one of ({', '.join(columns)}) with {flag}"
    )


def row_reference(file: str | Path, row: int, column: str = _DEFAULT_IMAGE_COLUMN) -> str:
    """The image reference of row `row` of a Parquet file, as records and `caption` inputs use it."""
    suffix = "" if column == _DEFAULT_IMAGE_COLUMN else f"&column={column}"
    return f"{file}#row={row}{suffix}"


def is_row_reference(image: str) -> bool:
    """Whether `image` names an image stored in a Parquet file (`file.parquet#row=N`)."""
    return _ROW_REFERENCE.match(image) is not None


def reference_file(image: str) -> str:
    """The file an image is read from: the Parquet file of a row reference, else `image` itself."""
    match = _ROW_REFERENCE.match(image)
    return match["file"] if match else image


def row_references(path: Path, image_column: str | None = None) -> list[str]:
    """One `file.parquet#row=N` reference per row of the Parquet file(s) at `path`: what `caption`
    captions when given a Parquet dataset. Reads only the files' metadata."""
    references = []
    for file in parquet_files(path):
        parquet = open_parquet(str(file))
        column = pick_column(parquet.schema_arrow.names, image_column, IMAGE_COLUMNS, "image", str(file))
        references += [row_reference(file, row, column) for row in range(parquet.metadata.num_rows)]
    return references


def read_parquet_image(reference: str) -> bytes:
    """The encoded bytes of a `file.parquet#row=N[&column=C]` image: the cell's bytes, else the
    local file its path names (relative to the Parquet file's folder), read as every image file is
    (`read_image_file`). Raises UserError (ImageLoadError for that file) or OSError."""
    match = _ROW_REFERENCE.match(reference)
    if match is None:
        raise ValueError(f"not a Parquet row reference: {reference!r}")
    file, row = match["file"], int(match["row"])
    column = match["column"] or _DEFAULT_IMAGE_COLUMN
    mtime_ns = os.stat(file).st_mtime_ns
    starts = _row_group_starts(file, mtime_ns)
    if not 0 <= row < starts[-1]:
        raise UserError(f"{file}: has no row {row} ({starts[-1]} rows)")
    group = bisect.bisect_right(starts, row) - 1
    value = _row_group_column(file, mtime_ns, group, column)[row - starts[group]]
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str) or not value:
        raise UserError(f"{file}: row {row} has no image in column {column!r}")
    return read_image_file(Path(file).parent / value)  # only ever a local, regular file


@functools.lru_cache(maxsize=16)
def _row_group_starts(file: str, mtime_ns: int) -> list[int]:
    """The first row of each row group, and the row count at the end (mtime_ns: see `_cached_index`)."""
    metadata = open_parquet(file).metadata
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return starts


@functools.lru_cache(maxsize=2)  # images are read in row order: the current row group is enough
def _row_group_column(file: str, mtime_ns: int, group: int, column: str) -> list[Any]:
    parquet = open_parquet(file)
    if column not in parquet.schema_arrow.names:
        raise UserError(f"{file}: no column {column!r}")
    return parquet.read_row_group(group, columns=[column]).column(0).to_pylist()


def open_parquet(file: str) -> Any:
    require("scale", "pyarrow", feature="Parquet datasets")
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise UserError(f"{file}: not a Parquet file ({' '.join(str(error).split())})") from None  # one line
