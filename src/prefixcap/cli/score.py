"""`prefixcap score`: score any captions (a COCO results file) against references, without a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from prefixcap.cli.common import bounded
from prefixcap.data import FORMATS
from prefixcap.errors import UserError

if TYPE_CHECKING:
    from prefixcap.evaluation import Evaluation, References, Sample, ScoreConfig

METRIC_NAMES = "bleu,meteor,rouge,cider,spice,bertscore,clipscore,stats"  # prefixcap.evaluation.ALL_METRICS
DATASETS_HELP = (
    "reference captions: a COCO caption file, a Karpathy split file (dataset_coco.json), JSONL, CSV, "
    "an image folder with .txt captions or WebDataset shards (any dataset `prefixcap prepare` reads)"
)


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


def add_reference_arguments(parser: argparse.ArgumentParser, *, data_flag: str, data_help: str) -> None:
    """Where the references (and images) come from; `evaluate` calls the same thing --data."""
    parser.add_argument(data_flag, dest="data", required=True, metavar="DATA", help=data_help)
    parser.add_argument("--format", choices=FORMATS, help="dataset format (default: detected from DATA)")
    parser.add_argument(
        "--split",
        default="test",
        help="split to use when the dataset has several, e.g. Karpathy's train/val/test (default: test); "
        "a dataset with one split is used whole",
    )
    parser.add_argument(
        "--images",
        "--images-root",
        dest="images",
        type=Path,
        metavar="DIR",
        help="folder the dataset's image paths start from, e.g. the COCO root holding val2014/ "
        "(default: the dataset file's folder); CLIPScore and the report's pictures need the images",
    )


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics",
        metavar="LIST",
        help=f"comma-separated subset of {METRIC_NAMES}. Default: all that can run here, skipping the others with "
        "a one-line reason (SPICE needs Java 8/11 and a CoreNLP download; METEOR needs Java; BERTScore and "
        "CLIPScore need their models; CLIPScore needs the images). Named metrics must run.",
    )
    group.add_argument(
        "--bertscore-model",
        default="roberta-large",
        metavar="ID_OR_DIR",
        help="BERTScore model: hub id or folder (default: roberta-large)",
    )
    group.add_argument(
        "--bertscore-layers",
        type=bounded(int, 0),
        metavar="N",
        help="BERTScore representation layer (default: bert-score's choice for the model, 17 for roberta-large)",
    )
    group.add_argument(
        "--bertscore-baseline",
        type=Path,
        metavar="FILE",
        help="baseline TSV for rescaled BERTScore (default: the file bert-score ships for the model, if any)",
    )
    group.add_argument(
        "--clip-model",
        metavar="ID_OR_DIR",
        help="full CLIP model (hub id or folder, with text tower and tokenizer) for CLIPScore "
        "(default: openai/clip-vit-base-patch32, as in Hessel et al.; `evaluate` defaults to the model's own CLIP)",
    )
    group.add_argument(
        "--metric-batch-size",
        type=bounded(int, 1),
        metavar="N",
        default=64,
        help="sentences or images per BERTScore/CLIPScore batch (default: 64)",
    )
    group.add_argument(
        "--examples",
        type=bounded(int, 0),
        default=24,
        metavar="N",
        help="random examples in report.html (default: 24)",
    )


def run(args: argparse.Namespace) -> int:
    from prefixcap.evaluation import load_references, load_results, match_samples

    config = score_config(args)  # check options before reading anything big
    results = load_results(args.results)
    references = load_references(args.data, split=args.split, images_root=args.images, format=args.format)
    samples = match_samples(results, references.records)
    out = args.out or args.results.parent
    score_and_report(samples, references, config, out, args, source=f"{args.results} vs {args.data}")
    return 0


def score_config(args: argparse.Namespace, *, default_clip_model: str | None = None) -> ScoreConfig:
    """The ScoreConfig the command-line options describe."""
    from prefixcap.evaluation import BERTScoreConfig, ScoreConfig
    from prefixcap.evaluation.scoring import DEFAULT_CLIP_MODEL

    metrics = tuple(name.strip().lower() for name in args.metrics.split(",") if name.strip()) if args.metrics else None
    if args.metrics is not None and not metrics:
        raise UserError("--metrics is empty; name at least one of " + METRIC_NAMES)
    if args.bertscore_baseline is not None and not args.bertscore_baseline.is_file():
        raise UserError(f"{args.bertscore_baseline}: no such baseline file")
    bertscore = BERTScoreConfig(
        model_type=args.bertscore_model,
        num_layers=args.bertscore_layers,
        baseline_path=str(args.bertscore_baseline) if args.bertscore_baseline else None,
        batch_size=args.metric_batch_size,
        device=args.device,
    )
    clip_model = args.clip_model or default_clip_model or DEFAULT_CLIP_MODEL
    return ScoreConfig(
        metrics, bertscore=bertscore, clip_model=clip_model, device=args.device, batch_size=args.metric_batch_size
    )


def score_and_report(
    samples: list[Sample],
    references: References,
    config: ScoreConfig,
    out: Path,
    args: argparse.Namespace,
    *,
    source: str,
) -> Evaluation:
    """Score, write metrics.json / per_image.json / report.html, and print the metrics."""
    from prefixcap.evaluation import score_samples, write_outputs

    evaluation = score_samples(samples, config, train_captions=references.train_captions)
    write_outputs(out, evaluation, source=source, num_examples=args.examples)
    width = max(map(len, evaluation.metrics), default=0)
    for name, value in evaluation.metrics.items():
        print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}", file=sys.stderr)
    return evaluation
