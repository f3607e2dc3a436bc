"""`prefixcap label`: caption images with a large teacher model into a dataset a student trains on."""

from __future__ import annotations

import argparse
import sys

from prefixcap.cli.common import add_column_arguments, bounded
from prefixcap.errors import UserError

EPILOG = """\
teachers (--teacher KIND:TARGET):
  hf:FOLDER_OR_HUB_ID    a local Hugging Face image-text-to-text model (SmolVLM, Qwen2-VL, LLaVA, ...),
                         batched; its repository's own code runs only with --trust-remote-code
  openai:URL#MODEL       an OpenAI-compatible endpoint: URL is the API base (as the openai client's
                         base_url), MODEL the model to ask for (without #MODEL: the endpoint's only one).
                         The API key is read from $OPENAI_API_KEY (--api-key-env NAME for another variable),
                         never from the command line, and is never printed or written.

prompts (--prompt): a preset (short, detailed, tags, sd-prompt) or a template, with {name} (the image's
  file name without extension), {folder} (its folder's name) and {existing} (the text of the .txt
  caption file beside it, empty if none); {{ and }} for literal braces.

outputs (--format, default from --out: FILE.jsonl is jsonl):
  jsonl        FILE.jsonl: {"image", "caption", "teacher", "instruction"} per line
  imagefolder  DIR/metadata.jsonl ({"file_name", "text", ...}) for images inside DIR
  parquet      DIR/SPLIT-00000.parquet, ...: image bytes, path and caption, as the datasets library writes
  sidecar      IMAGE.txt beside each image, or under --out DIR mirroring the input folders
  A rerun skips the images already labelled; an interrupted run loses only the requests in flight.
  Failures are listed as 'error: IMAGE: REASON' and in FILE.failures.jsonl (DIR/label-failures.jsonl);
  the exit status is then 1, and a rerun tries them again.

examples:
  prefixcap label photos/ --teacher openai:http://127.0.0.1:8000/v1#Qwen/Qwen2-VL-7B-Instruct --out labels.jsonl
  prefixcap label photos/ --teacher hf:HuggingFaceTB/SmolVLM-256M-Instruct --prompt detailed --out labels.jsonl
  prefixcap label heldout/ --teacher openai:https://api.example.com/v1#big-vlm --out labels.jsonl --split test
  prefixcap label training_set/ --teacher openai:http://127.0.0.1:11434/v1#llava --format sidecar --dry-run
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from prefixcap.labeling.outputs import OUTPUT_FORMATS
    from prefixcap.labeling.prompts import PRESETS

    parser = subparsers.add_parser(
        "label",
        help="label images with a large teacher model (a local VLM or an OpenAI-compatible endpoint)",
        description="Ask a teacher about every image and write its answers as a caption dataset that "
        "`prefixcap prepare` and `train` read, to train a fast student on it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="IMAGES",
        help="image files, folders, globs, WebDataset shards or Parquet datasets (as `prefixcap caption` reads)",
    )  # fmt: skip
    parser.add_argument("--teacher", required=True, metavar="SPEC", help="hf:FOLDER_OR_HUB_ID or openai:URL#MODEL")
    parser.add_argument("--out", metavar="FILE_OR_DIR", help="the dataset to write (sidecar files: optional)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, help="dataset format (default: jsonl for FILE.jsonl)")
    parser.add_argument(
        "--split", choices=("train", "val", "test"),
        help="the split these images belong to, written with each label (default: none, which readers take as "
        "train); label held-out images with --split test to evaluate a student against the teacher",
    )  # fmt: skip
    parser.add_argument(
        "--prompt", metavar="TEMPLATE",
        help=f"a preset ({', '.join(PRESETS)}; default: short) or a template with {{name}}, {{folder}}, {{existing}}",
    )  # fmt: skip
    parser.add_argument("--limit", type=bounded(int, 1), metavar="N", help="label at most N images in this run")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print each image and its prompt, the first request as it would be sent, and an estimate of the "
        "requests and time; load no model, send nothing, write nothing",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=bounded(int, 1), metavar="N",
        help="longest answer, in tokens (default: 256 for hf:, the endpoint's default for openai:)",
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=bounded(float, 0.0), default=0.0,
        help="sampling temperature; 0 (the default) decodes greedily, for reproducible labels",
    )  # fmt: skip
    add_column_arguments(parser, caption=False)

    local = parser.add_argument_group("hf: teachers")
    local.add_argument("--device", help="torch device (default: cuda if available)")
    local.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"),
        help="precision; auto (the default): bfloat16 on CUDA and on CPUs with bf16 matrix instructions, else float32",
    )  # fmt: skip
    local.add_argument("--batch-size", type=bounded(int, 1), help="images per batch (default: 8)")
    local.add_argument(
        "--trust-remote-code", action="store_true", default=None,
        help="run the Python code the model's repository ships (some models, e.g. Florence-2 on older "
        "transformers, need it); off by default because that code runs with your permissions",
    )  # fmt: skip

    remote = parser.add_argument_group("openai: teachers")
    remote.add_argument("--concurrency", type=bounded(int, 1, 256), help="requests in flight (default: 4)")
    remote.add_argument(
        "--rate-limit", type=bounded(float, 0.001), metavar="PER_MINUTE",
        help="at most this many requests a minute, retries included (default: no limit)",
    )  # fmt: skip
    remote.add_argument(
        "--timeout", type=bounded(float, 0.1), metavar="SECONDS",
        help="seconds to wait for each answer before trying again (default: 120)",
    )  # fmt: skip
    remote.add_argument(
        "--max-retries", type=bounded(int, 0, 100), metavar="N",
        help="tries after the first on 429, 5xx, timeouts and dropped connections, then a failure record (default: 5)",
    )  # fmt: skip
    remote.add_argument(
        "--retry-delay", type=bounded(float, 0.0), metavar="SECONDS",
        help="wait before the first retry, doubled after each (at most 60 s) unless the server sends "
        "Retry-After (default: 1)",
    )  # fmt: skip
    remote.add_argument(
        "--api-key-env", metavar="NAME",
        help="the environment variable holding the API key (default: OPENAI_API_KEY; unset: no key is sent)",
    )  # fmt: skip
    remote.add_argument(
        "--max-image-side", type=bounded(int, 0), metavar="PIXELS",
        help="scale larger images down to this longest side before sending (0: never; default: 1024)",
    )  # fmt: skip
    remote.add_argument(
        "--image-format", choices=("jpeg", "png"),
        help="how images are encoded for sending: jpeg (quality 95, the default) or png (lossless, larger)",
    )  # fmt: skip
    parser.set_defaults(func=run)


# the options of one kind of teacher (dest -> flag); unset ones are None, so that a flag for the other kind shows
_KIND_FLAGS = {
    "hf": {"device": "--device", "dtype": "--dtype", "batch_size": "--batch-size", "trust_remote_code": "--trust-remote-code"},
    "openai": {
        "concurrency": "--concurrency", "rate_limit": "--rate-limit", "timeout": "--timeout",
        "max_retries": "--max-retries", "retry_delay": "--retry-delay", "api_key_env": "--api-key-env",
        "max_image_side": "--max-image-side", "image_format": "--image-format",
    },
}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from prefixcap.inputs.expand import expand_inputs
    from prefixcap.labeling import LabelPlan, PromptTemplate, TeacherOptions, load_teacher, open_dataset, run_label_job
    from prefixcap.labeling.outputs import write_failures
    from prefixcap.labeling.teachers import parse_spec

    kind, _ = parse_spec(args.teacher)
    for other, flags in _KIND_FLAGS.items():
        if other != kind and (given := [flag for name, flag in flags.items() if getattr(args, name) is not None]):
            raise UserError(f"{given[0]} applies to {other}: teachers, not {kind}:")
    template = PromptTemplate.parse(args.prompt)
    fmt = args.format or _format_of(args.out)
    sources, missing = expand_inputs(args.paths, image_column=args.image_column)
    for path, reason in missing:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if not sources:
        raise UserError("no images found in the given paths")
    dataset = open_dataset(fmt, args.out, split=args.split, paths=args.paths, sources=sources)
    plan = LabelPlan(sources, dataset.done, template, limit=args.limit)
    if plan.total == 0 and not args.dry_run:  # a finished dataset: no model loads, no endpoint is asked
        for _ in plan.items():
            pass  # counts the images labelled before
        write_failures(dataset.failures_path, [])
        print(
            f"0 labelled, {plan.skipped} skipped (labelled before): {args.out or 'every caption file'} is complete",
            file=sys.stderr,
        )
        return 1 if missing else 0
    options = TeacherOptions(
        **{name: value for name in TeacherOptions.__dataclass_fields__ if (value := getattr(args, name)) is not None}
    )
    teacher = load_teacher(args.teacher, options, dry_run=args.dry_run)
    if args.dry_run:
        return _dry_run(plan, teacher)
    if getattr(teacher, "precision", None):
        print(f"dtype: {teacher.precision}", file=sys.stderr)
    show = sys.stderr.isatty() and plan.total != 0
    try:
        with tqdm(total=plan.total, unit="img", disable=not show, file=sys.stderr) as bar:
            summary = run_label_job(
                plan, teacher, dataset, progress=bar,
                on_failure=lambda image, failure: tqdm.write(f"error: {_name(image)}: {failure.reason}", file=sys.stderr),
            )  # fmt: skip
    finally:
        teacher.close()
    where = args.out or "caption files beside the images"
    failures = f"; failures in {dataset.failures_path}" if summary.failures and dataset.failures_path else ""
    print(f"{summary} by {teacher.description}; wrote {where}{failures}", file=sys.stderr)
    return 1 if summary.failures or missing else 0


def _format_of(out: str | None) -> str:
    if out is not None and out.lower().endswith(".jsonl"):
        return "jsonl"
    raise UserError("choose the dataset format with --format (jsonl, imagefolder, parquet or sidecar)")


def _dry_run(plan, teacher) -> int:
    from prefixcap.labeling.teachers import LabelItem

    count, first = 0, None
    for item in plan.items():
        if isinstance(item, LabelItem):
            print(f"would label {_name(item.image)}: {item.instruction}")
            first = first or item
            count += 1
        else:
            print(f"error: {_name(item[0])}: {item[1].reason}", file=sys.stderr)
    print(f"{count} to label, {plan.skipped} labelled before", file=sys.stderr)
    if first is not None:
        print(f"first request:\n{teacher.preview(first)}")
        print(f"estimate: {teacher.estimate(count)}")
    return 0


def _name(image: str) -> str:
    from prefixcap.jobs.writers import printable

    return printable(image)
