"""`prefixcap caption`: caption image files, folders, globs and WebDataset shards, in one process
or split over many (`accelerate launch -m prefixcap caption ... --output OUT_DIR/`)."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from prefixcap.cli.common import (
    add_column_arguments,
    add_generation_arguments,
    add_jpeg_draft_argument,
    add_model_arguments,
    add_outside_root_argument,
    add_rerank_arguments,
    add_retrieval_arguments,
    bounded,
    load_captioner_and_request,
    report_failure,
    retrieval_kwargs,
)
from prefixcap.cli.ray import EPILOG as RAY_EPILOG
from prefixcap.cli.ray import add_ray_arguments
from prefixcap.cli.sidecar import EPILOG as SIDECAR_EPILOG
from prefixcap.cli.sidecar import add_sidecar_arguments, run_sidecars, sidecar_requested
from prefixcap.errors import UserError
from prefixcap.inputs.expand import expand_inputs
from prefixcap.inputs.sources import RemoteShard, Source, is_shard
from prefixcap.jobs.writers import FORMATS, require_format
from prefixcap.system.terminal import for_terminal

EPILOG = """\
output:
  By default one file (--output FILE) or stdout. A folder instead (OUT_DIR/captions.<format>,
  OUT_DIR/summary.json and OUT_DIR/parts/) when --output is an existing folder or ends with "/",
  and always when several processes run. A rerun into the same folder skips the parts that are
  already finished, so a killed job loses at most one part per process.

examples:
  prefixcap caption photos/ 'more/*.png' > captions.txt
  prefixcap caption 'shards/train-{000..099}.tar' --output out/ --format parquet
  prefixcap caption hf://datasets/OWNER/NAME --output out.parquet --format parquet --embed-images
  accelerate launch --multi_gpu --num_processes 8 -m prefixcap caption shards/*.tar --output out/
  prefixcap caption training_set/ --sidecar
  prefixcap caption new_photos/ --sidecar --model run/best --datastore ds/house   # in the house style
  prefixcap caption photos/ --model run/best --datastore ds/coco --show-retrieved --format jsonl
  prefixcap caption /data/read-only-photos/ --sidecar-dir captions/ --existing overwrite --dry-run
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption images",
        description="Caption image files, folders (searched recursively), glob patterns and WebDataset "
        "shards (local .tar files, URLs, 'pipe:' commands, brace patterns like shard-{000..099}.tar). "
        "Folders and '**' globs follow symlinked folders, each real folder once, and each file is "
        "captioned once however it was reached. Names found on disk are always opened as files. "
        "Unreadable images and folders are reported on stderr as 'error: PATH: REASON' and skipped; "
        "the exit status is 1 if any failed, except with folder output, where failures are "
        "expected at scale and counted in summary.json.",
        epilog=EPILOG + "\n" + SIDECAR_EPILOG + "\n" + RAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="image file, folder, glob pattern, WebDataset shard, Parquet dataset (one image per row; a folder "
        "of .parquet files without images) or hub dataset hf://datasets/OWNER/NAME[@REV]",
    )  # fmt: skip
    add_model_arguments(parser)
    add_jpeg_draft_argument(parser)
    add_generation_arguments(parser)
    add_rerank_arguments(parser)
    add_retrieval_arguments(parser, show="jsonl: 'retrieved', [{caption, score}, ...] best first")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="text: 'path<TAB>caption' lines, with backslash, tab and newline escaped as \\\\, \\t, \\n; "
        "jsonl: {path, caption, captions}, and scores with --rerank; csv: path,caption,...; parquet: columns path, caption, "
        "captions, and image with --embed-images (default: text, or jsonl into a folder)",
    )
    parser.add_argument("--output", help="write results to this file, or into this folder (see 'output' below)")
    parser.add_argument(
        "--embed-images", action="store_true",
        help="parquet output: also store each image's bytes, in an 'image' column that the datasets library "
        "loads as its Image feature (load_dataset('parquet', data_files=...) gives an image-text dataset)",
    )  # fmt: skip
    add_column_arguments(parser, caption=False)
    add_outside_root_argument(parser)
    parser.add_argument(
        "--workers", type=bounded(int, 0), default=min(4, os.cpu_count() or 1),
        help="DataLoader processes decoding images ahead of the model, per process; 0 decodes in the "
        "main process (default: 4, or the number of CPUs if fewer)",
    )  # fmt: skip
    parser.add_argument(
        "--part-size", type=bounded(int, 1), default=1000,
        help="folder output: images per part file, the unit of work and of resuming; each WebDataset "
        "shard is one part (default: 1000)",
    )  # fmt: skip
    add_sidecar_arguments(parser)
    add_ray_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefixcap.system.processes import process_state

    if args.ray is not None:
        if args.datastore is not None:
            raise UserError("--ray does not retrieve yet: caption with --datastore in one process or with accelerate")
        from prefixcap.cli.ray import run_caption

        return run_caption(args)
    if args.rerank_clip and not args.rerank:
        raise UserError("--rerank-clip chooses the CLIP for --rerank clipscore; add --rerank clipscore")
    retrieval_kwargs(args)  # --retrieve-k and --show-retrieved without --datastore fail before anything else
    state = process_state()
    if sidecar_requested(args):
        if args.show_retrieved:
            raise UserError("--show-retrieved writes into JSON lines records; a sidecar file holds the caption only")
        return run_sidecars(args, state, load=lambda: load_captioner_and_request(args, jpeg_draft=args.jpeg_draft))
    to_folder = _writes_folder(args.output, state.num_processes)
    fmt = args.format or ("jsonl" if to_folder else "text")
    if fmt == "parquet" and not args.output:
        raise UserError("parquet output needs --output FILE or --output FOLDER/")
    if args.embed_images and fmt != "parquet":
        raise UserError("--embed-images needs --format parquet")
    if args.show_retrieved and fmt != "jsonl":
        raise UserError("--show-retrieved writes the retrieved captions into JSON lines records: add --format jsonl")
    require_format(fmt)
    sources, missing = expand_inputs(
        args.paths, image_column=args.image_column, allow_outside_root=args.allow_outside_root
    )
    if args.embed_images and (remote := next((s for s in sources if isinstance(s, RemoteShard)), None)):
        raise UserError(f"{remote}: --embed-images reads images again when writing, which a remote shard cannot do")
    if state.is_main_process:
        for path, reason in missing:
            print(for_terminal(f"error: {path}: {reason}"), file=sys.stderr)
    if not sources:
        raise UserError("no images found in the given paths")
    _check_output(args.output, to_folder, fmt, sources)  # before the model loads
    if args.device is None and state.num_processes > 1:
        args.device = str(state.device)  # each process on its own GPU
    captioner, request = load_captioner_and_request(args, jpeg_draft=args.jpeg_draft)
    if to_folder:
        return _caption_to_folder(captioner, request, sources, missing, args, fmt, state)
    failed = _caption_to_file(captioner, request, sources, args, fmt)
    return 1 if failed or missing else 0


def _writes_folder(output: str | None, num_processes: int) -> bool:
    """Folder output when several processes run, or when --output names a folder."""
    named_folder = output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir())
    if not (named_folder or num_processes > 1):
        return False
    if output is None:
        raise UserError("with several processes, results go to a folder: add --output OUT_DIR/")
    if Path(output).exists() and not Path(output).is_dir():
        raise UserError(f"{output}: is a file, but results go to a folder here")
    return True


def _check_output(output: str | None, to_folder: bool, fmt: str, sources: list[Source]) -> None:
    from prefixcap.jobs.to_folder import prepare_directory
    from prefixcap.jobs.writers import check_output

    if to_folder:
        prepare_directory(output, fmt, sources)
    elif output is not None:
        check_output([Path(output)], sources)


def _caption_to_file(captioner, request, sources: list[Source], args: argparse.Namespace, fmt: str) -> int:
    """Caption into --output or stdout; a file appears only once complete. Returns the number of failures."""
    from tqdm import tqdm

    from prefixcap.jobs.to_file import caption_to_file
    from prefixcap.jobs.writers import open_output

    total = None if any(map(is_shard, sources)) else len(sources)
    show_progress = sys.stderr.isatty() and (total is None or total > args.batch_size)
    with open_output(args.output, fmt) if args.output else nullcontext(sys.stdout) as out:
        with tqdm(total=total, unit="img", disable=not show_progress, file=sys.stderr) as bar:
            failures = caption_to_file(
                captioner, sources, out, fmt, request, name=args.output or "<stdout>", batch_size=args.batch_size,
                num_workers=args.workers, progress=bar, on_failure=report_failure, embed_images=args.embed_images,
            )  # fmt: skip
    return failures


def _caption_to_folder(
    captioner, request, sources: list[Source], missing: list[tuple[str, str]], args: argparse.Namespace, fmt: str,
    state,
) -> int:  # fmt: skip
    from prefixcap.jobs.to_folder import caption_to_folder

    summary = caption_to_folder(
        captioner, sources, args.output, request, model=args.model, state=state, fmt=fmt, part_size=args.part_size,
        batch_size=args.batch_size, num_workers=args.workers, input_failures=missing, embed_images=args.embed_images,
        on_failure=report_failure,
    )  # fmt: skip
    if summary is not None:  # the main process
        print(
            f"{summary.captioned} of {summary.images} images captioned ({summary.failed} failed) by "
            f"{summary.processes} process(es) at {summary.images_per_second:.2f} images/s; "
            f"wrote {summary.output}",
            file=sys.stderr,
        )
    return 0  # a non-zero status would make accelerate/torchrun report a crashed job
