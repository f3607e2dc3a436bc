"""What gets scored: generated captions (COCO results files) matched with their references."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixcap.data import CaptionRecord, load_records, split_records
from prefixcap.errors import UserError
from prefixcap.evaluation.notices import notice
from prefixcap.pipeline.features import MANIFEST, FeatureStore


@dataclass(frozen=True)
class Sample:
    """One image to score."""

    image_id: str  # as a string: COCO results files give ints, datasets give strings
    caption: str  # the generated caption
    references: tuple[str, ...]  # its human captions
    image: str | None = None  # file path or "shard.tar#member" (for CLIPScore and the report); None: unknown


@dataclass
class References:
    """The reference split to score against, plus the training captions when the dataset has them."""

    records: list[CaptionRecord]  # the images of the evaluated split
    train_captions: list[str] | None  # for the novelty statistic; None when no train split is known


def load_results(path: str | Path) -> dict[str, str]:
    """Read a COCO results file, `[{"image_id": ..., "caption": ...}, ...]`, as {image id: caption}."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(rows, list):
        raise UserError(f'{path}: expected a COCO results list [{{"image_id": ..., "caption": ...}}]')
    results: dict[str, str] = {}
    for n, row in enumerate(rows):
        if not (isinstance(row, dict) and "image_id" in row and isinstance(row.get("caption"), str)):
            raise UserError(f"{path}: entry {n} needs an 'image_id' and a string 'caption'")
        image_id = str(row["image_id"])
        if image_id in results:
            raise UserError(f"{path}: image_id {image_id} has more than one caption; keep one per image")
        results[image_id] = row["caption"]
    if not results:
        raise UserError(f"{path}: no captions")
    return results


def results_json(captions: Mapping[str, str]) -> list[dict[str, int | str]]:
    """{image id: caption} in COCO results format; numeric ids become ints, as COCO tools expect."""
    return [{"image_id": _coco_id(image_id), "caption": caption} for image_id, caption in captions.items()]


def _coco_id(image_id: str) -> int | str:
    return int(image_id) if image_id.isdigit() and str(int(image_id)) == image_id else image_id


def load_references(
    path: str | Path,
    *,
    split: str = "test",
    images_root: str | Path | None = None,
    format: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    allow_outside_root: bool = False,
) -> References:
    """The `split` images of any dataset `load_records` reads (see `choose_split`)."""
    records = load_records(
        path, format=format, images_root=images_root, image_column=image_column, caption_column=caption_column,
        allow_outside_root=allow_outside_root,
    )  # fmt: skip
    chosen = choose_split({record.split for record in records}, split, path)
    if chosen is None:
        return References(records, None)
    return References(split_records(records, chosen), _captions(split_records(records, "train")))


def load_split(
    data: str | Path,
    *,
    split: str = "test",
    images_root: str | Path | None = None,
    format: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    allow_outside_root: bool = False,
) -> tuple[References, torch.Tensor | None, FeatureStore | None]:
    """The `split` of a feature store (with its stored embeddings) or of any dataset (embeddings None).
    The store comes back too, so that the caller can check that its model expects these features.
    The columns choose those of a Hugging Face dataset (see `load_records`)."""
    if not (Path(data) / MANIFEST).is_file():
        references = load_references(
            data, split=split, images_root=images_root, format=format, image_column=image_column,
            caption_column=caption_column, allow_outside_root=allow_outside_root,
        )  # fmt: skip
        return references, None, None
    store = FeatureStore(data)
    chosen = choose_split(store.manifest.splits, split, store.path)
    train = _captions(store.records("train")) if chosen is not None and "train" in store.manifest.splits else None
    return References(store.records(chosen), train), store.embeddings(chosen), store


def _captions(records: Iterable[CaptionRecord]) -> list[str] | None:
    """Every caption of `records` (the training captions that corpus statistics compare with), or None."""
    return [caption for record in records for caption in record.captions] or None


def choose_split(splits: Iterable[str], split: str, source: str | Path) -> str | None:
    """`split`, checked against a dataset's `splits`; None when the dataset has only one split.

    A dataset with a single split (an official COCO file, a JSONL without splits) is used whole,
    whatever `split` says; with several splits, `split` must be one of them.
    """
    splits = sorted(set(splits))
    if len(splits) == 1:
        return None
    if split not in splits:
        raise UserError(f"{source}: no {split!r} split (it has {', '.join(splits)}); choose one with --split")
    return split


def match_samples(results: Mapping[str, str], references: Sequence[CaptionRecord]) -> list[Sample]:
    """Pair each generated caption with its image's references, in reference order.

    Every result must have references. Images without a result are allowed (scoring a subset)
    but announced, because corpus metrics over a subset are not comparable with the full split.
    """
    by_id = {record.image_id: record for record in references}
    unknown = [image_id for image_id in results if image_id not in by_id]
    if unknown:
        raise UserError(f"{len(unknown)} result image_id(s) are not in the references, e.g. {unknown[0]!r}")
    samples = [
        Sample(record.image_id, results[record.image_id], record.captions, record.image)
        for record in references
        if record.image_id in results
    ]
    if len(samples) < len(references):
        notice(f"scoring {len(samples)} of the {len(references)} reference images; the others have no result")
    return samples
