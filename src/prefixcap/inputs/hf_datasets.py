"""Hugging Face dataset layouts as image inputs: hub dataset ids (`hf://datasets/OWNER/NAME[@rev]`),
imagefolder and Parquet detection, and images stored in Parquet files.

An image stored inside a Parquet file is referenced as `data.parquet#row=12` (the row of the
file, counted from 0), or `data.parquet#row=12&column=img` when its column is not `image`; such a
reference is read by `read_parquet_image`, a local file read like a tar member's. Paths found in
the data are only ever opened as local files, never as URLs or commands, and only inside the
Parquet file's folder unless allowed (`dataset_paths`). The readers that turn
these datasets into caption records are `prefixcap.data.hf`'s.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.dataset_paths import Confinement
from prefixcap.inputs.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_BYTES,
    check_image_bytes,
    open_regular_file,
    read_image_file,
)
from prefixcap.system.extras import require

IMAGE_COLUMNS = ("image", "img", "file_name")  # tried in this order when no --image-column is given
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
HUB_PREFIX = "hf://datasets/"
# A row group is read whole, one column at a time: these bound what one read holds, whatever the
# file's size on disk. pyarrow writes row groups of at most 1,048,576 rows by default; `datasets`
# writes 100 images a row group.
MAX_ROWS_PER_GROUP = 1024 * 1024
MAX_ROW_GROUP_BYTES = 2**30  # one column of one row group, uncompressed
_MAX_PATH = 4096  # bytes in a path: Linux's PATH_MAX
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


def hub_dataset_root(location: Path) -> Path:
    """The folder a hub dataset's image paths may lead to (see `dataset_paths`): its folder in the
    cache (`datasets--OWNER--NAME/`), where `snapshots/REV/` links each file to `blobs/`."""
    return next((folder.parent for folder in location.parents if folder.name == "snapshots"), location)


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


def row_references(path: Path, image_column: str | None = None) -> Iterator[str]:
    """One `file.parquet#row=N` reference per row of the Parquet file(s) at `path`, streamed: what
    `caption` captions when given a Parquet dataset. Reads only the files' metadata; a file with a
    row group over the limits (`check_row_group`) is refused whole, before any of its rows."""
    for file in parquet_files(path):
        with open_parquet(file) as parquet:
            column = pick_column(parquet.schema_arrow.names, image_column, IMAGE_COLUMNS, "image", str(file))
            metadata = parquet.metadata
        for group in range(metadata.num_row_groups):
            check_row_group(metadata, file, group, [column], image_column=column)
        yield from (row_reference(file, row, column) for row in range(metadata.num_rows))


def check_row_group(
    metadata: Any, file: str | Path, group: int, columns: Sequence[str], *, image_column: str | None = None
) -> None:
    """Refuse row group `group` before it is read, from the file's metadata: a few KB of Parquet
    can hold millions of rows or GBs of repeated bytes. Over MAX_ROWS_PER_GROUP rows, or a column
    of `columns` over MAX_ROW_GROUP_BYTES uncompressed (the image column: also over MAX_IMAGE_BYTES
    a row, so that some cell is over the image cap), is a UserError naming the file."""
    row_group = metadata.row_group(group)
    rows = row_group.num_rows
    if rows > MAX_ROWS_PER_GROUP:
        raise UserError(f"{file}: row group {group} has {rows:,} rows, over the {MAX_ROWS_PER_GROUP:,}-row limit")
    sizes: dict[str, int] = {}
    for leaf in range(row_group.num_columns):  # a struct or list column is stored as several leaves
        chunk = row_group.column(leaf)
        name = chunk.path_in_schema.split(".")[0]
        sizes[name] = sizes.get(name, 0) + chunk.total_uncompressed_size
    for column in columns:
        limit = min(MAX_ROW_GROUP_BYTES, rows * MAX_IMAGE_BYTES) if column == image_column else MAX_ROW_GROUP_BYTES
        if sizes.get(column, 0) > limit:
            raise UserError(
                f"{file}: row group {group}: column {column!r} is {sizes[column]:,} bytes uncompressed, "
                f"over the {limit:,}-byte limit"
            )


def read_parquet_image(reference: str, *, allow_outside_root: bool = False) -> bytes:
    """The encoded bytes of a `file.parquet#row=N[&column=C]` image: the cell's bytes (at most
    MAX_IMAGE_BYTES), else the local file its path names (relative to the Parquet file's folder,
    and inside it unless `allow_outside_root`: see `dataset_paths`), read as every image file is
    (`read_image_file`). Raises UserError (ImageLoadError for an image refused or over the cap, or
    a file that cannot be read) or OSError."""
    match = _ROW_REFERENCE.match(reference)
    if match is None:
        raise ValueError(f"not a Parquet row reference: {reference!r}")
    file, row = match["file"], int(match["row"])
    column = match["column"] or _DEFAULT_IMAGE_COLUMN
    mtime_ns = os.stat(file).st_mtime_ns
    starts = _row_group_starts(file, mtime_ns)
    if not 0 <= row < starts[-1]:
        raise UserError(f"{file}: has no row {row} ({starts[-1]:,} rows)")
    group = bisect.bisect_right(starts, row) - 1
    cell = _row_group_column(file, mtime_ns, group, column)[row - starts[group]]
    value = _cell_image(cell)
    if isinstance(value, str) and value:
        path, folder = Path(file).parent / value, Path(file).parent
        if reason := Confinement(allow_outside_root).problem(path, folder):
            raise ImageLoadError(reference, reason)
        return read_image_file(path)  # only ever a local, regular file
    if value is None or not value.size:
        raise UserError(f"{file}: row {row} has no image in column {column!r}")
    check_image_bytes(value.size, reference)
    return value.to_pybytes()


def stored_images(column: Any) -> list[bool | str | None]:
    """Per cell of an image column (a pyarrow array read from a row group): True where it holds
    image bytes, else the path it holds, else None; without copying any image's bytes."""
    return [value if value is None or isinstance(value, str) else True for value in map(_cell_image, column)]


def _cell_image(cell: Any) -> Any:
    """A pyarrow image cell's bytes (a pyarrow buffer, not copied), else its path, else None:
    `datasets` writes {bytes, path} structs; plain binary and string columns also hold images. A
    "path" longer than a path can be is none."""
    import pyarrow as pa

    if pa.types.is_struct(cell.type):
        if not cell.is_valid:
            return None
        fields = {cell.type.field(i).name for i in range(cell.type.num_fields)}
        if "bytes" in fields and cell["bytes"].is_valid:
            cell = cell["bytes"]
        elif "path" in fields:
            cell = cell["path"]
        else:
            return None
    if not cell.is_valid:
        return None
    if pa.types.is_dictionary(cell.type):
        cell = cell.value
    if pa.types.is_binary(cell.type) or pa.types.is_large_binary(cell.type):
        return cell.as_buffer()
    if (pa.types.is_string(cell.type) or pa.types.is_large_string(cell.type)) and cell.as_buffer().size <= _MAX_PATH:
        return cell.as_py()
    return None


@functools.lru_cache(maxsize=16)
def _row_group_starts(file: str, mtime_ns: int) -> list[int]:
    """The first row of each row group, and the row count at the end (mtime_ns: see `_cached_index`)."""
    with open_parquet(file) as parquet:
        metadata = parquet.metadata
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return starts


@functools.lru_cache(maxsize=1)  # images are read in row order: the current row group is enough
def _row_group_column(file: str, mtime_ns: int, group: int, column: str) -> Any:
    """One column of one row group, as pyarrow holds it (no Python copy of its cells)."""
    with open_parquet(file) as parquet:
        if column not in parquet.schema_arrow.names:
            raise UserError(f"{file}: no column {column!r}")
        return read_row_group(parquet, file, group, [column], image_column=column).column(0)


def read_row_group(
    parquet: Any, file: str | Path, group: int, columns: Sequence[str], *, image_column: str | None = None
) -> Any:
    """`columns` of row group `group` of an `open_parquet` file, as a pyarrow table, checked before
    it is read (`check_row_group`) and after: text and bytes stay dictionary-encoded as stored,
    and a column other than `image_column` (whose cells are read one by one, with their own caps)
    that would take over MAX_ROW_GROUP_BYTES once its values are expanded (as converting it to
    Python does) is refused in one line."""
    check_row_group(parquet.metadata, file, group, columns, image_column=image_column)
    table = parquet.read_row_group(group, columns=list(columns))
    for column in columns:
        if column != image_column and (size := _expanded_bytes(table.column(column))) > MAX_ROW_GROUP_BYTES:
            raise UserError(
                f"{file}: row group {group}: column {column!r} holds {size:,} bytes once expanded, "
                f"over the {MAX_ROW_GROUP_BYTES:,}-byte limit"
            )
    return table


def _expanded_bytes(array: Any) -> int:
    """About the bytes a pyarrow array takes with its dictionaries expanded: a dictionary of one
    large value referenced by every row is small as stored, and huge as Python strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        return sum(map(_expanded_bytes, array.chunks))
    if pa.types.is_dictionary(array.type):
        return int(pc.sum(pc.binary_length(array.dictionary).take(array.indices)).as_py() or 0)
    if pa.types.is_struct(array.type) or pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        children = array.flatten()
        return sum(map(_expanded_bytes, children if isinstance(children, list) else [children]))
    return array.nbytes


@contextmanager
def open_parquet(file: str | Path) -> Iterator[Any]:
    """`file` as a pyarrow `ParquetFile`, opened as a regular file (`open_regular_file`), for the
    block; its text and bytes columns are read as stored, dictionary-encoded (see `read_row_group`).
    A damaged file, here or while the block reads it, is one UserError naming it."""
    require("scale", "pyarrow", feature="Parquet datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular_file(file) as handle:
        try:
            schema = pq.ParquetFile(handle).schema
            leaves = [schema.column(i) for i in range(len(schema))]
            dictionaries = [leaf.path for leaf in leaves if leaf.physical_type == "BYTE_ARRAY"]
            parquet = pq.ParquetFile(handle, read_dictionary=dictionaries)
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{file}: not a Parquet file ({_one_line(error)})") from None
        try:
            yield parquet
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{file}: cannot read this Parquet file ({_one_line(error)})") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__  # pyarrow's messages span lines
