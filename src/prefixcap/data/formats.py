"""Readers for the caption dataset formats users already have, all producing `CaptionRecord`s.

Formats, detected from the path unless `format=` is given:

| format       | path                                   | detected by                                  |
|--------------|----------------------------------------|----------------------------------------------|
| `coco`       | `captions_train2014.json`              | `.json` with `images` + `annotations`        |
| `karpathy`   | `dataset_coco.json`                    | `.json` whose images carry `sentences`       |
| `jsonl`      | `captions.jsonl`                       | `.jsonl`                                     |
| `csv`        | `captions.csv`                         | `.csv`                                       |
| `folder`     | `photos/` with `a.jpg` + `a.txt`       | a folder without `.tar` files                |
| `webdataset` | `shards/`, `x.tar`, `x-{000..009}.tar` | a `.tar`, a folder of them, or a pattern     |
| `imagefolder`| `ds/` with `metadata.jsonl` / `.csv`   | a folder with metadata files (or in `train/`)|
| `parquet`    | `data/train-00000-of-00001.parquet`    | a `.parquet`, or a folder of them            |

Hugging Face datasets (`imagefolder`, `parquet`, hub ids `hf://datasets/OWNER/NAME[@rev]` and
`datasets.Dataset` objects) are read by `data.hf`, with `image_column` / `caption_column` choosing
the columns (default: the first of `image`, `img`, `file_name` / `text`, `caption`, `captions`,
`sentences`).

JSONL and CSV rows, and the images of COCO and Karpathy files, may carry a `prompt`: text that the
captions continue (training then learns the captions given image + prompt); rows of one image
must agree on it.

Image files are not opened here: `prepare` reads each one and reports the unreadable ones.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prefixcap.data.hf import export_dataset, is_dataset_object, read_imagefolder, read_parquet
from prefixcap.data.records import (
    CaptionRecord,
    RecordMerger,
    csv_rows,
    json_lines,
    parse_caption,
    parse_json,
    parse_prompt,
    parse_split,
    split_name,
)
from prefixcap.errors import UserError
from prefixcap.inputs.dataset_paths import Confinement
from prefixcap.inputs.hf_datasets import dataset_kind, hub_dataset_root, is_hub_dataset, resolve_hub_dataset
from prefixcap.inputs.images import IMAGE_EXTENSIONS
from prefixcap.inputs.sources import (
    expand_shards,
    image_key,
    is_shard_spec,
    member_reference,
    read_members,
    shard_files,
    tar_index,
)
from prefixcap.system.extras import require

logger = logging.getLogger(__name__)

FORMATS = ("coco", "karpathy", "jsonl", "csv", "folder", "webdataset", "imagefolder", "parquet")
_COLUMN_FORMATS = ("imagefolder", "parquet")  # the formats whose columns can be chosen
_JSON = "json"  # a .json file, COCO or Karpathy: told apart once the file is parsed
# The formats whose files name their images by path (folders and shards hold theirs).
_NAMES_PATHS = frozenset({_JSON, "coco", "karpathy", "jsonl", "csv", "imagefolder", "parquet"})


def load_records(
    path: str | Path | Any,
    *,
    format: str | None = None,
    images_root: str | Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    allow_outside_root: bool = False,
) -> list[CaptionRecord]:
    """Read a caption dataset into records, in a deterministic order.

    `images_root` is the folder relative image paths start from (COCO, Karpathy, JSONL, CSV); it
    defaults to the dataset file's folder, or its parent if that folder is called `annotations`
    (COCO's own layout). Folders and shards hold their images themselves and ignore it.
    `path` may also be a hub dataset id (`hf://datasets/OWNER/NAME[@rev]`, downloaded first) or a
    `datasets.Dataset` (written once as Parquet into prefixcap's cache, so that records can name
    its images); `image_column` / `caption_column` choose the columns of `imagefolder` and
    `parquet` datasets. Every malformed input raises `UserError` with a one-line message naming the file.

    The image paths a dataset file holds (every format but folders and shards) must stay inside
    its root, through links (`images_root`, else the folder they start from; a hub dataset's
    folder in the cache): one that leads outside fails the whole read, in one line naming the row,
    unless `allow_outside_root` (a `datasets.Dataset` is the caller's own, and allowed anyway).
    """
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    root = Path(images_root) if images_root is not None else None
    confine = Confinement(allow_outside_root)
    if is_dataset_object(path):
        path, format = export_dataset(path), format or "parquet"
        confine = Confinement(allow_outside_root=True)
    elif is_hub_dataset(str(path)) and not os.path.lexists(path):
        path = resolve_hub_dataset(str(path))
        confine = Confinement(allow_outside_root, root=hub_dataset_root(path) if root is None else None)
    source = str(path)
    kind = format or _detect_format(source)
    options = {"confine": confine} if kind in _NAMES_PATHS else {}
    try:
        if kind in _COLUMN_FORMATS:
            records = _READERS[kind](source, root, image_column, caption_column, **options)
        elif image_column or caption_column:
            raise UserError(f"{source}: columns can be chosen for {' and '.join(_COLUMN_FORMATS)} datasets, not {kind}")
        else:
            records = _READERS[kind](source, root, **options)
    except UnicodeDecodeError as error:
        raise _not_utf8(source, error) from None
    except OSError as error:
        raise UserError(f"{error.filename or source}: cannot read ({error.strerror or error})") from None
    if not records:
        raise UserError(f"{source}: no captioned images found (read as {kind})")
    _check_unique_ids(records, source)
    return records


def _detect_format(path: str) -> str:
    """The format name for `path` (a `.json` file is parsed later to tell COCO from Karpathy)."""
    location = Path(path)
    if kind := dataset_kind(location):
        return kind
    if location.is_dir():
        return "webdataset" if shard_files(location) else "folder"
    if location.is_file():
        suffix = location.suffix.lower()
        by_suffix = {".json": _JSON, ".jsonl": "jsonl", ".csv": "csv", ".tar": "webdataset"}
        if suffix not in by_suffix:
            raise UserError(f"{path}: cannot tell the dataset format from '{suffix}'; pass --format")
        return by_suffix[suffix]
    if is_shard_spec(path):
        return "webdataset"
    raise UserError(f"{path}: no such file or folder")


# --- COCO and Karpathy ---------------------------------------------------------------------------


def _read_json(
    source: str, images_root: Path | None, layout: str | None = None, *, confine: Confinement
) -> list[CaptionRecord]:
    """COCO or Karpathy: `layout` if forced by `format=`, else whichever the document looks like."""
    path = _existing_file(source)
    with open(path, encoding="utf-8") as file:
        document = parse_json(file.read(), str(path), line=True)
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path}: expected a JSON object with an 'images' list (COCO or Karpathy split file)")
    layout = layout or ("coco" if "annotations" in document else "karpathy")
    root = images_root or _default_root(path)
    if layout == "coco":
        return _coco_records(document, path, root, confine)
    return _karpathy_records(images, path, root, confine)


def _default_root(path: Path) -> Path:
    """A dataset file's folder, or the parent of COCO's `annotations/` folder."""
    return path.parent.parent if path.parent.name == "annotations" else path.parent


def _coco_records(document: dict[str, Any], path: Path, root: Path, confine: Confinement) -> list[CaptionRecord]:
    """Official COCO captions: `images` [{id, file_name}] and `annotations` [{image_id, caption}]."""
    annotations = document.get("annotations")
    if not isinstance(annotations, list):
        raise UserError(f"{path}: not a COCO caption file (no 'annotations' list)")
    file_names: dict[Any, tuple[int, str]] = {}  # id -> (its position in `images`, its file name)
    prompts: dict[Any, str | None] = {}  # an image's optional `prompt`
    for n, image in enumerate(document["images"]):
        if not (isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str)):
            raise UserError(f"{path}: images[{n}] needs an 'id' and a string 'file_name'")
        file_names[image["id"]] = (n, image["file_name"])
        prompts[image["id"]] = parse_prompt(image.get("prompt"), f"{path}: images[{n}]")
    captions: dict[Any, list[str]] = {}
    for n, annotation in enumerate(annotations):
        if not (isinstance(annotation, dict) and "image_id" in annotation and "caption" in annotation):
            raise UserError(f"{path}: annotations[{n}] needs an 'image_id' and a 'caption'")
        if annotation["image_id"] not in file_names:
            raise UserError(f"{path}: annotations[{n}] names image_id {annotation['image_id']!r}, not in 'images'")
        caption = parse_caption(annotation["caption"], f"{path}: annotations[{n}]")
        captions.setdefault(annotation["image_id"], []).append(caption)
    locate = _coco_image_locator(root)
    return [
        CaptionRecord(
            str(image_id),
            confine.path(locate(name), root, f"{path}: images[{n}]"),
            tuple(captions[image_id]),
            _coco_split(name, path),
            prompts[image_id],
        )  # fmt: skip
        for image_id, (n, name) in file_names.items()
        if image_id in captions  # COCO lists images without captions too (e.g. test2014)
    ]


def _coco_image_locator(root: Path) -> Callable[[str], Path]:
    """Resolve a COCO file name under `root`, or under `root/train2014/` for `COCO_train2014_...`."""
    has_folder = functools.cache(lambda name: (root / name).is_dir())

    def locate(file_name: str) -> Path:
        match = re.match(r"COCO_([a-z]+\d{4})_", file_name)
        if match and has_folder(match[1]):
            return (root / match[1] / file_name).absolute()
        return (root / file_name).absolute()

    return locate


def _coco_split(file_name: str, path: Path) -> str:
    """The split named in the image file name (`..._val2014_...`), else in the JSON file name."""
    for name in (file_name, path.name):
        match = re.search(r"(train|val|test)20\d\d", name)
        if match:
            return match[1]
    return "train"


def _karpathy_records(images: list[Any], path: Path, root: Path, confine: Confinement) -> list[CaptionRecord]:
    """Karpathy split files (`dataset_coco.json`, also Flickr8k/30k): images with their sentences."""
    records = []
    for n, image in enumerate(images):
        where = f"{path}: images[{n}]"
        if not (isinstance(image, dict) and isinstance(image.get("filename"), str)):
            raise UserError(f"{where} needs a string 'filename'")
        if not isinstance(image.get("sentences"), list) or "split" not in image:
            raise UserError(f"{where} needs a 'sentences' list and a 'split' (is this a Karpathy split file?)")
        relative = Path(image.get("filepath", ""), image["filename"])  # Flickr files have no filepath
        captions = []
        for sentence in image["sentences"]:
            if not (isinstance(sentence, dict) and "raw" in sentence):
                raise UserError(f"{where}: every sentence needs a 'raw' caption")
            captions.append(parse_caption(sentence["raw"], where))
        image_id = str(image["cocoid"]) if "cocoid" in image else relative.as_posix()
        split = parse_split(image["split"], where)  # restval -> train
        prompt = parse_prompt(image.get("prompt"), where)
        image_path = confine.path(root / relative, root, where)
        records.append(CaptionRecord(image_id, image_path, tuple(captions), split, prompt))
    return records


# --- JSONL and CSV -------------------------------------------------------------------------------


def _read_jsonl(source: str, images_root: Path | None, *, confine: Confinement) -> list[CaptionRecord]:
    """One JSON object per line; blank lines are allowed."""
    path = _existing_file(source)
    root = images_root or path.parent
    merger = RecordMerger()
    with open(path, encoding="utf-8") as file:
        for where, row in json_lines(path, file):
            _add_row(merger, row, root, where, confine)
    return merger.records()


def _read_csv(source: str, images_root: Path | None, *, confine: Confinement) -> list[CaptionRecord]:
    """A header row, then one row per caption (`caption`) or per image (`captions`: a JSON list)."""
    path = _existing_file(source)
    root = images_root or path.parent
    merger = RecordMerger()
    with open(path, encoding="utf-8-sig", newline="") as file:  # -sig: spreadsheets add a BOM
        columns, rows = csv_rows(path, file)
        if "image" not in columns or not {"caption", "captions"} & set(columns):
            raise UserError(f"{path}: needs an 'image' column and a 'caption' or 'captions' column (has {columns})")
        for where, row in rows:
            # Empty cells count as absent, so one file may mix `caption` rows and `captions` rows.
            row = {key: value for key, value in row.items() if value not in (None, "")}
            if "captions" in row:
                row["captions"] = parse_json(row["captions"], where, "'captions' is not a JSON list")
            _add_row(merger, row, root, where, confine)
    return merger.records()


def _add_row(merger: RecordMerger, row: dict[str, Any], root: Path, where: str, confine: Confinement) -> None:
    """Check one JSONL/CSV row and add its captions to the record of its image."""
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        raise UserError(f"{where}: needs an 'image' path")
    if ("caption" in row) == ("captions" in row):
        raise UserError(f"{where}: needs exactly one of 'caption' (a string) or 'captions' (a list)")
    if "caption" in row:
        captions = [parse_caption(row["caption"], where)]
    elif isinstance(row["captions"], list) and row["captions"]:
        captions = [parse_caption(caption, where) for caption in row["captions"]]
    else:
        raise UserError(f"{where}: 'captions' must be a non-empty list of strings")
    split = parse_split(row["split"], where) if "split" in row else "train"
    image_id = str(row.get("image_id", Path(image).as_posix()))
    prompt = parse_prompt(row.get("prompt"), where)
    merger.add(confine.path(root / image, root, where), image_id, captions, split, where, prompt)


# --- Folders and WebDataset shards ---------------------------------------------------------------


def _read_folder(source: str, images_root: Path | None) -> list[CaptionRecord]:
    """Images anywhere under a folder, each captioned by a same-name `.txt` (one caption a line).

    The split is the image's parent folder name when that names a split (`train/`, `val/`,
    `test/`), else train. Hidden files and folders are skipped.
    """
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"{source}: not a folder")
    images = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )
    records = []
    for image in images:
        text_file = image.with_suffix(".txt")
        captions = _caption_lines(text_file.read_bytes(), str(text_file)) if text_file.is_file() else ()
        if captions:
            split = split_name(image.parent.name) or "train"
            records.append(CaptionRecord(image.relative_to(folder).as_posix(), str(image.absolute()), captions, split))
    _warn_uncaptioned(len(images) - len(records), source)
    return records


def _read_webdataset(source: str, images_root: Path | None) -> list[CaptionRecord]:
    """Samples `key.jpg` (or another image extension) + `key.txt` in tar shards, in shard order.

    The split is the shard's folder name when that names a split, else the first word of the
    shard's name (`train-000.tar`, `val_00.tar`), else train.
    """
    require("scale", "webdataset", feature="WebDataset datasets")
    from webdataset.tariterators import (
        base_plus_ext,  # WebDataset's own rule for grouping members
    )

    shards = expand_shards(source)
    root = os.path.commonpath([shard.parent for shard in shards])  # ids are relative to it
    records = []
    for shard in tqdm(shards, desc="indexing shards", unit="shard", disable=None, leave=False):
        samples: dict[str, dict[str, str]] = {}  # key -> extension -> member name, in tar order
        for member in tar_index(shard):
            key, extension = base_plus_ext(member)
            if key is not None:
                samples.setdefault(key, {})[extension.lower()] = member
        # (key, image member, caption member) of each sample that has both.
        pairs = [(key, members.get(image_key(members)), members.get("txt")) for key, members in samples.items()]
        pairs = [(key, image, text) for key, image, text in pairs if image and text]
        texts = read_members(shard, [text for _, _, text in pairs])
        split = _shard_split(shard)
        shard_id = shard.relative_to(root).as_posix()
        found = len(records)
        for (key, image, text), data in zip(pairs, texts):
            captions = _caption_lines(data, member_reference(shard, text))
            if captions:
                records.append(CaptionRecord(f"{shard_id}#{key}", member_reference(shard, image), captions, split))
        _warn_uncaptioned(len(samples) - (len(records) - found), str(shard))
    return records


def _shard_split(shard: Path) -> str:
    match = re.match(r"[a-z]+(?=[-_.])", shard.name.lower())
    return split_name(shard.parent.name) or (match and split_name(match[0])) or "train"


def _caption_lines(data: bytes, source: str) -> tuple[str, ...]:
    """The captions of a `.txt` caption file: its non-empty lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(source, error) from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _warn_uncaptioned(count: int, source: str) -> None:
    if count:
        logger.warning("%s: skipped %d samples without an image or a non-empty caption .txt", source, count)


# --- shared checks -------------------------------------------------------------------------------


def _existing_file(source: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{source}: no such file")
    return path


def _not_utf8(source: str, error: UnicodeDecodeError) -> UserError:
    return UserError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})")


def _check_unique_ids(records: list[CaptionRecord], source: str) -> None:
    seen: set[str] = set()
    for record in records:
        if record.image_id in seen:
            raise UserError(f"{source}: image_id {record.image_id!r} is used by more than one image")
        seen.add(record.image_id)


_READERS: dict[str, Callable[..., list[CaptionRecord]]] = {
    _JSON: _read_json,
    "coco": functools.partial(_read_json, layout="coco"),
    "karpathy": functools.partial(_read_json, layout="karpathy"),
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "folder": _read_folder,
    "webdataset": _read_webdataset,
    "imagefolder": read_imagefolder,
    "parquet": read_parquet,
}
