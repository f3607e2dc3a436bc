"""`prefixcap score`: score any captions (a COCO results file) against references, without a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefixcap.cli.common import (
    DATASETS_HELP,
    add_reference_arguments,
    add_scoring_arguments,
    print_evaluation,
    score_config,
)
from prefixcap.system.extras import require


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score captions against references (BLEU, METEOR, ROUGE-L, CIDEr, SPICE, BERTScore, CLIPScore)",
        description="Score generated captions, e.g. another system's, against reference captions, and write "
        "DIR/metrics.json, DIR/per_image.json and a self-contained DIR/report.html.",
    )
    parser.add_argument(
        "--results",
        required=True,
        type=Path,
        metavar="FILE",
        help='COCO results file: [{"image_id": ..., "caption": ...}]',
    )
    add_reference_arguments(parser, data_flag="--references", data_help=DATASETS_HELP)
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: the results file's folder)")
    parser.add_argument(
        "--device", help="device for BERTScore and CLIPScore, e.g. cpu, cuda:1 (default: cuda if available)"
    )
    add_scoring_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require("eval", "pycocoevalcap", "matplotlib", feature="prefixcap score")
    from prefixcap.evaluation import load_references, load_results, match_samples, score_and_write

    config = score_config(args)  # check options before reading anything big
    results = load_results(args.results)
    references = load_references(
        args.data, split=args.split, images_root=args.images, format=args.format,
        image_column=args.image_column, caption_column=args.caption_column, allow_outside_root=args.allow_outside_root,
    )  # fmt: skip
    samples = match_samples(results, references.records)
    out = args.out or args.results.parent
    source = f"{args.results} vs {args.data}"
    evaluation = score_and_write(samples, references, config, out, source=source, num_examples=args.examples)
    print_evaluation(evaluation, out)
    return 0
