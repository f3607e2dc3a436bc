"""`prefixcap evaluate`: caption every image of a split, then score the captions like `prefixcap score`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefixcap.cli.common import (
    DATASETS_HELP,
    add_generation_arguments,
    add_model_arguments,
    add_reference_arguments,
    add_retrieval_arguments,
    add_scoring_arguments,
    bounded,
    generation_kwargs,
    load_captioner_and_request,
    print_evaluation,
    score_config,
)
from prefixcap.errors import UserError
from prefixcap.system.extras import require


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
        "--out", type=Path, metavar="DIR",
        help="output folder, new or holding an earlier evaluation (default: evaluation/NAME, a folder per model: "
        "evaluation/run-best for --model run/best, evaluation/clipcap-coco for clipcap-coco)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the earlier evaluation in DIR (a folder holding anything else is never written into)",
    )  # fmt: skip
    parser.add_argument(
        "--workers",
        type=bounded(int, 0),
        default=min(4, os.cpu_count() or 1),
        metavar="N",
        help="image decoding processes when DATA is a dataset, not a feature store (default: %(default)s)",
    )
    add_generation_arguments(parser)
    add_retrieval_arguments(parser)
    add_scoring_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require("eval", "pycocoevalcap", "matplotlib", feature="prefixcap evaluate")
    from prefixcap.evaluation import caption_records, match_samples, results_json, score_and_write
    from prefixcap.evaluation.notices import notice
    from prefixcap.evaluation.outputs import (
        EVALUATION_DIRECTORY,
        default_evaluation_dir,
        is_evaluation_dir,
        write_json,
    )
    from prefixcap.evaluation.references import load_split
    from prefixcap.system.atomic import check_output_dir

    args.out = args.out or default_evaluation_dir(args.model)
    check_output_dir(args.out, what=EVALUATION_DIRECTORY, is_ours=is_evaluation_dir, overwrite=args.overwrite)
    kwargs = generation_kwargs(args)
    if kwargs.get("num_return_sequences", 1) > 1:
        raise UserError("evaluate scores one caption per image; drop --num-captions")
    captioner, request = load_captioner_and_request(args)
    model = captioner.model
    # CLIPScore's default CLIP: the model's own encoder when it is a CLIP (a SigLIP or DINOv2 one is not)
    own_clip = model.config.vision_encoder if model.vision_encoder.family == "clip" else None
    config = score_config(args, default_clip_model=own_clip)

    # 1. The split to caption, with stored image embeddings when DATA is a feature store.
    references, embeddings, store = load_split(
        args.data, split=args.split, images_root=args.images, format=args.format,
        image_column=args.image_column, caption_column=args.caption_column, allow_outside_root=args.allow_outside_root,
    )  # fmt: skip
    if store is not None:
        store.check_encoder(model.config, model.image_processor)

    # 2. Caption it, and keep the results in COCO format before scoring.
    captions, failures = caption_records(
        captioner, references.records, embeddings=embeddings, batch_size=args.batch_size, workers=args.workers,
        request=request,
    )  # fmt: skip
    if failures:
        notice(f"{len(failures)} unreadable image(s) not captioned or scored, e.g. {failures[0]}")
    if not captions:
        raise UserError(f"{args.data}: no image of the split could be read")
    write_json(args.out / "results.json", results_json(captions))
    del captioner, model  # free the accelerator for BERTScore and CLIPScore

    # 3. Score, as `prefixcap score` would on results.json.
    samples = match_samples(captions, [record for record in references.records if record.image_id in captions])
    decoding = ", ".join(f"{name}={value}" for name, value in kwargs.items()) or "the model's defaults"
    source = f"{args.model} on {args.data} ({len(samples)} images) · decoding: {decoding}"
    if args.datastore is not None:
        source += f" · retrieval from {args.datastore}"
    evaluation = score_and_write(samples, references, config, args.out, source=source, num_examples=args.examples)
    print_evaluation(evaluation, args.out)
    return 0
