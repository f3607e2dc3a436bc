"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prefixcap.data import FORMATS
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.dataset_paths import OUTSIDE_ROOT_FLAG
from prefixcap.model.registry import DEFAULT_MODEL, REGISTRY
from prefixcap.options import CaptionRequest, GenerationOptions, TextOptions
from prefixcap.options.fields import Bounds, range_problem
from prefixcap.system.hardware import QUANTIZE_CHOICES
from prefixcap.system.hub import missing_from_hub
from prefixcap.system.terminal import for_terminal

if TYPE_CHECKING:
    from prefixcap.evaluation import Evaluation, ScoreConfig

Number = TypeVar("Number", int, float)


def add_model_arguments(
    parser: argparse.ArgumentParser, *, default_model: str | None = DEFAULT_MODEL, batch_size: bool = True
) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help=f"registered name ({', '.join(REGISTRY)}), model directory, `prefixcap export onnx` folder or hub repo id"
        + (f" (default: {default_model})" if default_model else ""),
    )
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model precision. auto (the default): bfloat16 on CUDA and on CPUs with bf16 matrix "
        "instructions (AMX or AVX512-BF16), where it is faster; float32 on other CPUs, where bf16 is "
        "emulated and slower. The choice is printed on stderr",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="int8: dynamic int8 weights for the decoder's linear layers (CPU only, float32 "
        "activations): faster decoding on CPUs, captions may differ slightly (default: none)",
    )
    if batch_size:
        parser.add_argument(
            "--batch-size", type=bounded(int, 1), default=32, help="images per model batch (default: 32)"
        )


def add_jpeg_draft_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode JPEGs at 1/2, 1/4 or 1/8 scale where the model's input size allows (PIL's draft "
        "mode): several times faster for large photos (see README, Speed); the pixels differ slightly "
        "from the reference preprocessing, so captions may too",
    )


GENERATION_GROUP = "decoding (unset options use the model's defaults)"


TEXT_GROUP = "caption text"
# The schemas whose fields become flags, each in its argument group.
OPTION_GROUPS = ((GENERATION_GROUP, GenerationOptions), (TEXT_GROUP, TextOptions))


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per GenerationOptions and TextOptions field: its help, its `flag` metadata or
    --field-name, dest = the field name, default None (unset = the model's or the schema's
    default); bools as --x/--no-x. Numbers are only checked finite here: their ranges are checked
    where the request is made, as the API's and the server's are."""
    for title, schema in OPTION_GROUPS:
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(schema)
        for option in dataclasses.fields(schema):
            flag = option.metadata.get("flag", "--" + option.name.replace("_", "-"))
            kind = next(t for t in typing.get_args(hints[option.name]) or [hints[option.name]] if t is not type(None))
            metavar = flag.removeprefix("--").replace("-", "_").upper()  # NUM_CAPTIONS, not NUM_RETURN_SEQUENCES
            if kind is bool:
                how: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
            elif kind is str:
                how = {"metavar": "TEXT"}
            else:
                how = {"type": bounded(kind, name=option.name), "metavar": metavar}
            group.add_argument(flag, dest=option.name, help=option.metadata["help"], **how)


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding and caption-text options the user set, by field name (no rules applied here:
    the model's `request` applies them); Captioner takes both kinds."""
    names = [option.name for _, schema in OPTION_GROUPS for option in dataclasses.fields(schema)]
    values = {name: getattr(args, name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def load_captioner(args: argparse.Namespace, **kwargs: Any):
    """The captioner the model arguments describe, and what it loaded on stderr."""
    return _load_captioner(args, None, **kwargs)[0]


def load_captioner_and_request(args: argparse.Namespace, **kwargs: Any) -> tuple[Any, CaptionRequest]:
    """The captioner, and the request the command line's decoding, text and --rerank options make,
    checked once against the model (one line for a bad option) before it says what it loaded;
    the reranker, which needs the model (its CLIP, its device), loads last."""
    captioner, request = _load_captioner(args, generation_kwargs(args), **kwargs)
    if getattr(args, "rerank", None) is not None:
        from prefixcap.evaluation.clipscore import load_reranker

        request = dataclasses.replace(request, rerank=load_reranker(captioner, args.rerank_clip))
    return captioner, request


def _load_captioner(args: argparse.Namespace, options: dict[str, Any] | None, **kwargs: Any) -> tuple[Any, Any]:
    from prefixcap.captioner import Captioner

    retrieval = retrieval_kwargs(args)
    captioner = Captioner.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, quantize=args.quantize, batch_size=args.batch_size,
        **retrieval, **kwargs,
    )  # fmt: skip
    request = None
    if options is not None:
        try:
            request = captioner.request(**options)
        except ValueError as error:
            raise UserError(str(error)) from None
    if args.dtype == "auto":
        print(f"dtype: {captioner.precision}", file=sys.stderr)
    if captioner.retrieval is not None:
        store = captioner.retrieval.store
        print(f"retrieval: {captioner.retrieval.k} captions per image from {store.path} ({len(store)} captions, "
              f"{store.settings.describe()})", file=sys.stderr)  # fmt: skip
    if args.quantize:
        print(f"quantize: {args.quantize} decoder linear layers, decoded by {captioner.decoding_path}", file=sys.stderr)
    return captioner, request


def report_failure(failure: ImageLoadError) -> None:
    """One `error:` line per unreadable image, above any progress bar, escaped for a terminal."""
    from tqdm import tqdm

    tqdm.write(for_terminal(f"error: {failure}"), file=sys.stderr)


def add_retrieval_arguments(parser: argparse.ArgumentParser, *, show: str | None = None) -> None:
    """--datastore and --retrieve-k, and --show-retrieved where outputs can hold what was retrieved
    (`show` is where, for its help)."""
    group = parser.add_argument_group("retrieval (models trained with `prefixcap train --datastore`)")
    group.add_argument(
        "--datastore", metavar="DS",
        help="caption datastore (`prefixcap datastore build`, with the model's CLIP): each image's prompt is the "
        "captions of its nearest images in it. Any datastore serves, not only the one the model was trained with: "
        "one of another domain, or of a captioned folder whose style new captions should follow",
    )  # fmt: skip
    group.add_argument(
        "--retrieve-k", type=bounded(int, 1), metavar="K",
        help="captions retrieved per image (default: as many as the model was trained with)",
    )  # fmt: skip
    if show is not None:
        group.add_argument(
            "--show-retrieved", action="store_true",
            help=f"also write each image's retrieved captions with their cosine scores ({show})",
        )  # fmt: skip


def retrieval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Captioner's retrieval arguments from the command line (none without --datastore)."""
    datastore = getattr(args, "datastore", None)
    if datastore is None:
        for flag in ("retrieve_k", "show_retrieved"):
            if getattr(args, flag, None):
                raise UserError(f"--{flag.replace('_', '-')} needs --datastore DS")
        return {}
    return {
        "datastore": datastore,
        "retrieve_k": args.retrieve_k,
        "show_retrieved": getattr(args, "show_retrieved", False),
    }


def add_rerank_arguments(parser: argparse.ArgumentParser, *, serve: bool = False) -> None:
    """--rerank (caption) or only --rerank-clip (serve, where each request asks with its `rerank` field)."""
    if not serve:
        parser.add_argument(
            "--rerank", choices=("clipscore",),
            help="order each image's captions best first by this score, and write the scores (jsonl: "
            "'scores'); pair it with --num-captions N to choose among N beams or samples. clipscore: "
            "CLIPScore (Hessel et al. 2021, w=2.5) of each caption against its image",
        )  # fmt: skip
    parser.add_argument(
        "--rerank-clip", metavar="MODEL",
        help="the full CLIP (both towers; hub id or folder) that scores captions for reranking "
        "(default: the model's own image encoder, if saved with its text tower)",
    )  # fmt: skip


def bounded(
    kind: Callable[[str], Number],
    minimum: Number | None = None,
    maximum: Number | None = None,
    *,
    bounds: Bounds | None = None,
    name: str | None = None,
) -> Callable[[str], Number]:
    """An argparse type (`int` or `float`) in [minimum, maximum] (or `bounds`, an option field's),
    so that a bad value fails before any work starts. Every numeric option of every command uses
    it; the range is checked by the options' one validator (`range_problem`), so the line is the
    one the Python API gives for the field `name`. NaN and infinities are refused."""
    if bounds is None and (minimum is not None or maximum is not None):
        bounds = Bounds(minimum, maximum)

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if problem := range_problem(value, bounds):
            raise argparse.ArgumentTypeError(f"{name} {problem}" if name else problem)
        return value

    return parse


# ---------------------------------------------------------------- scoring (`score` and `evaluate`)
METRIC_NAMES = "bleu,meteor,rouge,cider,spice,bertscore,clipscore,stats"  # prefixcap.evaluation.ALL_METRICS
DATASETS_HELP = (
    "reference captions: a COCO caption file, a Karpathy split file (dataset_coco.json), JSONL, CSV, "
    "an image folder with .txt captions, WebDataset shards, a Hugging Face imagefolder or Parquet "
    "dataset, or a hub dataset hf://datasets/OWNER/NAME[@REV] (any dataset `prefixcap prepare` reads)"
)


def add_column_arguments(parser: argparse.ArgumentParser, *, caption: bool = True) -> None:
    """--image-column (and --caption-column) for Hugging Face datasets (imagefolder, Parquet, hub)."""
    parser.add_argument(
        "--image-column", metavar="NAME",
        help="Hugging Face datasets: the column holding the images (image structs, bytes or file names) "
        "(default: the first of image, img, file_name)",
    )  # fmt: skip
    if caption:
        parser.add_argument(
            "--caption-column", metavar="NAME",
            help="Hugging Face datasets: the column holding the caption, or a list of captions "
            "(default: the first of text, caption, captions, sentences)",
        )  # fmt: skip


def add_outside_root_argument(parser: argparse.ArgumentParser) -> None:
    """The one opt-in, shared by every command that reads datasets, to image paths outside a dataset's root."""
    parser.add_argument(
        OUTSIDE_ROOT_FLAG, action="store_true",
        help="read images that a dataset file names by a path leading outside the dataset's root (--images-root, "
        "else the dataset file's folder; for caption, a Parquet file's folder), also through links; without it "
        "such a path is refused: the whole dataset in one line for prepare, evaluate and score, that image for "
        "caption",
    )  # fmt: skip


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
    add_outside_root_argument(parser)
    add_column_arguments(parser)


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


def score_config(args: argparse.Namespace, *, default_clip_model: str | None = None) -> ScoreConfig:
    """The ScoreConfig the command-line options describe."""
    from prefixcap.evaluation import BERTScoreConfig, ScoreConfig
    from prefixcap.evaluation.scoring import DEFAULT_CLIP_MODEL

    metrics = tuple(name.strip().lower() for name in args.metrics.split(",") if name.strip()) if args.metrics else None
    if args.metrics is not None and not metrics:
        raise UserError("--metrics is empty; name at least one of " + METRIC_NAMES)
    if args.bertscore_baseline is not None and not args.bertscore_baseline.is_file():
        raise UserError(f"{args.bertscore_baseline}: no such baseline file")
    if metrics is None or "bertscore" in metrics:  # bert-score loads its model itself: check the hub for it first
        reason = missing_from_hub(args.bertscore_model)
        if reason and metrics is not None:  # else BERTScore is skipped, without retries
            raise UserError(f"cannot load BERTScore model {args.bertscore_model!r} ({reason})")
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


def print_evaluation(evaluation: Evaluation, out: Path) -> None:
    """The metrics on stdout and where the files went on stderr (what `score` and `evaluate` print)."""
    from prefixcap.evaluation.outputs import format_metrics

    if evaluation.metrics:
        print(format_metrics(evaluation.metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}", file=sys.stderr)
