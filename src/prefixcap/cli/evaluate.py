"""`prefixcap evaluate`: caption every image of a split, then score the captions like `prefixcap score`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefixcap.cli.common import (
    add_generation_arguments,
    add_model_arguments,
    bounded,
    check_generation,
    generation_kwargs,
    load_captioner,
)
from prefixcap.cli.score import (
    DATASETS_HELP,
    add_reference_arguments,
    add_scoring_arguments,
    score_and_report,
    score_config,
)
from prefixcap.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="caption a test split and score it (COCO metrics, BERTScore, CLIPScore, report)",
        description="Caption every image of a split of DATA with a model, write DIR/results.json (COCO results "
        "format), then score it as `prefixcap score` does: DIR/metrics.json, DIR/per_image.json and a "
        "self-contained DIR/report.html. DATA is a feature store from `prefixcap prepare` (no image encoding "
        "needed) or any dataset `prepare` reads (images are encoded on the fly).",
    )
    add_model_arguments(parser, default_model=None)
    add_reference_arguments(
        parser, data_flag="--data", data_help=f"a feature store from `prefixcap prepare`, or {DATASETS_HELP}"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("evaluation"), metavar="DIR", help="output folder (default: ./evaluation)"
    )
    parser.add_argument(
        "--workers",
        type=bounded(int, 0),
        default=min(4, os.cpu_count() or 1),
        metavar="N",
        help="image decoding processes when DATA is a dataset, not a feature store (default: %(default)s)",
    )
    add_generation_arguments(parser)
    add_scoring_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefixcap.evaluation import (
        caption_records,
        load_references,
        match_samples,
        results_json,
    )
    from prefixcap.evaluation.notices import notice
    from prefixcap.evaluation.scoring import write_json

    kwargs = generation_kwargs(args)
    if kwargs.get("num_return_sequences", 1) > 1:
        raise UserError("evaluate scores one caption per image; drop --num-captions")
    captioner = load_captioner(args)
    model = captioner.model
    check_generation(model, kwargs)
    config = score_config(args, default_clip_model=model.config.vision_encoder)  # the model's own CLIP

    # 1. The split to caption, with stored image embeddings when DATA is a feature store.
    store = _feature_store(args.data)
    embeddings = None
    if store is None:
        references = load_references(args.data, split=args.split, images_root=args.images, format=args.format)
    else:
        store.check_encoder(model.config, model.image_processor)
        references, embeddings = _store_split(store, args.split)

    # 2. Caption it, and keep the results in COCO format before scoring.
    captions, failures = caption_records(
        model, references.records, embeddings=embeddings, batch_size=args.batch_size, num_workers=args.workers, **kwargs
    )
    if failures:
        image, reason = next(iter(failures.items()))
        notice(f"{len(failures)} unreadable image(s) not captioned or scored, e.g. {image}: {reason}")
    if not captions:
        raise UserError(f"{args.data}: no image of the split could be read")
    write_json(args.out / "results.json", results_json(captions))
    del captioner, model  # free the accelerator for BERTScore and CLIPScore

    # 3. Score, as `prefixcap score` would on results.json.
    samples = match_samples(captions, [record for record in references.records if record.image_id in captions])
    decoding = ", ".join(f"{name}={value}" for name, value in kwargs.items()) or "the model's defaults"
    source = f"{args.model} on {args.data} ({len(samples)} images) · decoding: {decoding}"
    score_and_report(samples, references, config, args.out, args, source=source)
    return 0


def _feature_store(data: str):
    """The feature store at `data`, or None when `data` is a dataset."""
    from prefixcap.features import MANIFEST, FeatureStore

    return FeatureStore(data) if (Path(data) / MANIFEST).is_file() else None


def _store_split(store, split: str):
    """(References, embeddings) of the `split` images of a feature store (see `choose_split`)."""
    from prefixcap.evaluation import References
    from prefixcap.evaluation.references import choose_split

    chosen = choose_split(store.manifest.splits, split, store.path)
    train = None
    if chosen is not None and "train" in store.manifest.splits:
        train = [caption for record in store.records("train") for caption in record.captions]
    return References(store.records(chosen), train), store.embeddings(chosen)
