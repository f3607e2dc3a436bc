"""Hugging Face datasets as prefixcap reads them: `imagefolder` trees, Parquet files as the
`datasets` library writes them, hub ids (`hf://datasets/OWNER/NAME[@rev]`) and `datasets.Dataset`
objects, all read into `CaptionRecord`s. An image stored in a Parquet file becomes a
`data.parquet#row=12` reference (`prefixcap.inputs.hf_datasets`, which also knows the layouts).

Parquet files are read one row group at a time (the `datasets` library writes 100 images per row
group), so that a dataset never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefixcap.data.records import (
    CaptionRecord,
    RecordMerger,
    csv_rows,
    json_lines,
    parse_caption,
    parse_split,
    split_name,
)
from prefixcap.errors import UserError
from prefixcap.inputs.dataset_paths import Confinement
from prefixcap.inputs.hf_datasets import (
    IMAGE_COLUMNS,
    metadata_files,
    open_parquet,
    parquet_files,
    pick_column,
    read_row_group,
    row_reference,
    stored_images,
)
from prefixcap.system.extras import require

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("text", "caption", "captions", "sentences")


# --- columns -------------------------------------------------------------------------------------


def _captions(value: Any, where: str) -> list[str]:
    """A caption cell: a string, a list of strings, or Karpathy-style sentences ({"raw": ...});
    a CSV cell holding a JSON list counts as that list. An empty cell (None, "", []) is no
    captions: hub datasets leave their test captions out, and such rows are skipped."""
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            pass  # a caption that starts with "[" is still a caption
    if isinstance(value, str):
        return [parse_caption(value, where)]
    if isinstance(value, (list, tuple)):
        return [parse_caption(item.get("raw") if isinstance(item, dict) else item, where) for item in value]
    raise UserError(f"{where}: the caption must be a string or a list of strings, not {type(value).__name__}")


def _warn_uncaptioned(count: int, source: Path) -> None:
    if count:
        logger.warning("%s: skipped %d images without a caption", source, count)


def _split_of(*names: str) -> str:
    """The split the first of `names` that names one names (`validation/` -> val), else train."""
    for name in names:
        if split := split_name(name):
            return split
    return "train"


# --- imagefolder ---------------------------------------------------------------------------------


def read_imagefolder(
    source: str,
    images_root: Path | None,
    image_column: str | None = None,
    caption_column: str | None = None,
    *,
    confine: Confinement,
) -> list[CaptionRecord]:
    """An imagefolder tree: `metadata.jsonl` or `metadata.csv` files (at the root, or one per split
    folder such as `train/`, `validation/`, `test/`), each row naming an image relative to its
    metadata file (`file_name`) and giving its caption(s). The split is the metadata file's
    folder, else the first folder of the image's path, when it names one; else train. Images stay
    inside `images_root`, else the dataset's folder (see `load_records`)."""
    folder = Path(source)
    files = metadata_files(folder) if folder.is_dir() else []
    if not files:
        raise UserError(f"{source}: no metadata.jsonl or metadata.csv (an imagefolder dataset needs one)")
    merger = RecordMerger()
    for metadata in files:
        columns, rows = _metadata(metadata)
        image = pick_column(columns, image_column, ("file_name", *IMAGE_COLUMNS), "image", str(metadata))
        caption = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", str(metadata))
        base = images_root or metadata.parent
        skipped = 0
        for where, row in rows:
            name = row.get(image)
            if not isinstance(name, str) or not name.strip():
                raise UserError(f"{where}: needs an image file name in column {image!r}")
            if not Path(name).parts:
                raise UserError(f"{where}: file name {name!r} names no image file")
            path = metadata.parent / name
            relative = (path.relative_to(folder) if path.is_relative_to(folder) else path).as_posix()
            split = parse_split(row["split"], where) if "split" in row else _split_of(
                metadata.parent.name if metadata.parent != folder else "", Path(name).parts[0]
            )  # fmt: skip
            captions = _captions(row.get(caption), where)
            if captions:
                merger.add(confine.path(base / name, images_root or folder, where), relative, captions, split, where)
            skipped += not captions
        _warn_uncaptioned(skipped, metadata)
    return merger.records()


def _metadata(path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """The columns of a metadata.jsonl or metadata.csv file, and (where, row) for each of its rows."""
    with open(path, encoding="utf-8-sig", newline="") as file:
        if path.suffix == ".csv":
            columns, rows = csv_rows(path, file)
            return columns, list(rows)
        rows = list(json_lines(path, file))
    return list(dict.fromkeys(key for _, row in rows for key in row)), rows


# --- Parquet -------------------------------------------------------------------------------------


def read_parquet(
    source: str,
    images_root: Path | None,
    image_column: str | None = None,
    caption_column: str | None = None,
    *,
    confine: Confinement,
) -> list[CaptionRecord]:
    """Parquet files as `datasets` writes them (`Dataset.to_parquet`, the hub's `data/*.parquet`):
    an image column of `{bytes, path}` structs (or of file paths) and a caption column. An image
    with bytes becomes a `file.parquet#row=N` reference; one with only a path is that file
    (relative to, and inside, `images_root`, default the Parquet file's folder). The split is a
    `split` column, else the file's folder or the first word of its name
    (`train-00000-of-00002.parquet`), else train; the image id is an `image_id` column, else
    `FILE#ROW`. A row group over the limits of `read_row_group` (rows, bytes stored or expanded)
    is refused in one line."""
    require("scale", "pyarrow", feature="Parquet datasets")

    location = Path(source)
    files = parquet_files(location) if location.exists() else []
    if not files:
        raise UserError(f"{source}: no such Parquet file, or a folder without any")
    top = location if location.is_dir() else location.parent
    merger = RecordMerger()
    for file in files:
        with open_parquet(file) as parquet:
            columns = parquet.schema_arrow.names
            image = pick_column(columns, image_column, IMAGE_COLUMNS, "image", str(file))
            caption = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", str(file))
            wanted = [name for name in dict.fromkeys([image, caption, "image_id", "split"]) if name in columns]
            default_split = _split_of(file.parent.name, re.split(r"[-_.]", file.name)[0])
            relative = file.relative_to(top).as_posix() if location.is_dir() else file.name
            row, skipped = 0, 0
            for group in range(parquet.num_row_groups):
                table = read_row_group(parquet, file, group, wanted, image_column=image)
                images = stored_images(table.column(image))  # the images' bytes stay in pyarrow
                table = table.drop_columns([image]).to_pydict()
                for offset, value in enumerate(images):
                    where = f"{file}: row {row}"
                    captions = _captions(table[caption][offset], where)
                    if captions:
                        image_ref = _record_image(value, file, row, image, images_root or file.parent, where, confine)
                        split = parse_split(table["split"][offset], where) if "split" in table else default_split
                        image_id = str(table["image_id"][offset]) if "image_id" in table else f"{relative}#{row}"
                        merger.add(image_ref, image_id, captions, split, where)
                    skipped += not captions
                    row += 1
                del table, images  # one row group at a time
        _warn_uncaptioned(skipped, file)
    return merger.records()


def _record_image(
    value: bool | str | None, file: Path, row: int, column: str, root: Path, where: str, confine: Confinement
) -> str:
    """The `CaptionRecord.image` of one image cell (see `stored_images`): a row reference when the
    file holds its bytes, else the file its path names, from `root`."""
    if value is True:
        return row_reference(file.absolute(), row, column)
    if not value:
        raise UserError(f"{where}: column {column!r} holds neither image bytes nor a path")
    return confine.path(root / value, root, where)


# --- datasets.Dataset objects --------------------------------------------------------------------


def dataset_images(value: Any) -> Iterator[Any] | None:
    """The images of a `datasets` image column (`dataset["image"]`) or of a `datasets.Dataset`'s
    image column (the first of IMAGE_COLUMNS), decoded one at a time; None for anything else."""
    kind = type(value)
    if not kind.__module__.startswith("datasets."):
        return None
    if kind.__name__ == "Column":
        return iter(value)
    if kind.__name__ == "Dataset":
        column = pick_column(value.column_names, None, IMAGE_COLUMNS, "image", "the dataset")
        return (row[column] for row in value.select_columns([column]))
    return None


def is_dataset_object(value: Any) -> bool:
    """Whether `value` is a `datasets.Dataset` or `DatasetDict`, without importing `datasets`."""
    return type(value).__module__.startswith("datasets.") and type(value).__name__ in ("Dataset", "DatasetDict")


def export_dataset(dataset: Any) -> Path:
    """A `datasets.Dataset` (or each split of a `DatasetDict`) written once as Parquet into the
    `datasets` cache (`HF_DATASETS_CACHE/prefixcap/FINGERPRINT/`, so the same data is written once)
    and then read like any Parquet dataset: records, feature stores and evaluations name images
    that outlive this process. Files are named by split (`test.parquet`, row N's id `test.parquet#N`),
    so that the splits are kept; a Dataset without a split is `data.parquet`, read as train."""
    require("datasets", feature="datasets.Dataset inputs")
    import datasets

    from prefixcap.system.atomic import atomic_path

    if isinstance(dataset, datasets.DatasetDict):
        splits = dict(dataset)
    else:
        splits = {str(dataset.split) if dataset.split is not None else "data": dataset}
    key = "-".join(f"{name}.{split._fingerprint}" for name, split in sorted(splits.items()))
    folder = Path(datasets.config.HF_DATASETS_CACHE, "prefixcap", hashlib.sha256(key.encode()).hexdigest()[:16])
    for name, split in splits.items():
        target = folder / f"{name}.parquet"
        if not target.is_file():
            with atomic_path(target) as temporary:
                split.to_parquet(str(temporary))
    return folder
