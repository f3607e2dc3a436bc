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
    add_rerank_arguments,
    bounded,
    generation_kwargs,
    load_captioner,
    load_rerank,
)
from prefixcap.cli.ray import EPILOG as RAY_EPILOG
from prefixcap.cli.ray import add_ray_arguments
from prefixcap.cli.sidecar import EPILOG as SIDECAR_EPILOG
from prefixcap.cli.sidecar import add_sidecar_arguments, run_sidecars, sidecar_requested
from prefixcap.errors import UserError
from prefixcap.inputs.expand import expand_inputs
from prefixcap.inputs.sources import RemoteShard, Source, is_shard
from prefixcap.jobs.writers import FORMATS, require_format

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
        from prefixcap.cli.ray import run_caption

        return run_caption(args)
    kwargs = generation_kwargs(args)
    if args.rerank_clip and not args.rerank:
        raise UserError("--rerank-clip chooses the CLIP for --rerank clipscore; add --rerank clipscore")
    caption_kwargs = dict(kwargs)  # the decoding options, and `rerank` once the model has loaded
    state = process_state()
    if sidecar_requested(args):
        return run_sidecars(args, caption_kwargs, state, load=lambda: _load_captioner(args, kwargs, caption_kwargs))
    to_folder = _writes_folder(args.output, state.num_processes)
    fmt = args.format or ("jsonl" if to_folder else "text")
    if fmt == "parquet" and not args.output:
        raise UserError("parquet output needs --output FILE or --output FOLDER/")
    if args.embed_images and fmt != "parquet":
        raise UserError("--embed-images needs --format parquet")
    require_format(fmt)
    sources, missing = expand_inputs(args.paths, image_column=args.image_column)
    if args.embed_images and (remote := next((s for s in sources if isinstance(s, RemoteShard)), None)):
        raise UserError(f"{remote}: --embed-images reads images again when writing, which a remote shard cannot do")
    if state.is_main_process:
        for path, reason in missing:
            print(f"error: {path}: {reason}", file=sys.stderr)
    if not sources:
        raise UserError("no images found in the given paths")
    _check_output(args.output, to_folder, fmt, sources)  # before the model loads
    if args.device is None and state.num_processes > 1:
        args.device = str(state.device)  # each process on its own GPU
    captioner = _load_captioner(args, kwargs, caption_kwargs)
    if to_folder:
        return _caption_to_folder(captioner, sources, missing, args, fmt, caption_kwargs, state)
    failed = _caption_to_file(captioner, sources, args, fmt, caption_kwargs)
    return 1 if failed or missing else 0


def _load_captioner(args: argparse.Namespace, kwargs: dict, caption_kwargs: dict):
    """The model, with the decoding options checked against its defaults before any work; adds
    the --rerank scorer, which needs the model (its CLIP, its device), to `caption_kwargs`."""
    captioner = load_captioner(args, generation=kwargs, jpeg_draft=args.jpeg_draft)
    caption_kwargs.update(load_rerank(args, captioner))
    return captioner


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
    from prefixcap.jobs.output import prepare_directory
    from prefixcap.jobs.writers import check_output

    if to_folder:
        prepare_directory(output, fmt, sources)
    elif output is not None:
        check_output([Path(output)], sources)


def _caption_to_file(captioner, sources: list[Source], args: argparse.Namespace, fmt: str, kwargs: dict) -> int:
    """Caption into --output or stdout; a file appears only once complete. Returns the number of failures."""
    from tqdm import tqdm

    from prefixcap.jobs.output import caption_to_file
    from prefixcap.jobs.writers import open_output

    total = None if any(map(is_shard, sources)) else len(sources)
    show_progress = sys.stderr.isatty() and (total is None or total > args.batch_size)
    with open_output(args.output, fmt) if args.output else nullcontext(sys.stdout) as out:
        with tqdm(total=total, unit="img", disable=not show_progress, file=sys.stderr) as bar:
            failures = caption_to_file(
                captioner,
                sources,
                out,
                fmt,
                name=args.output or "<stdout>",
                batch_size=args.batch_size,
                num_workers=args.workers,
                progress=bar,
                on_failure=lambda failure: tqdm.write(f"error: {failure}", file=sys.stderr),
                embed_images=args.embed_images,
                **kwargs,
            )
    return len(failures)


def _caption_to_folder(
    captioner,
    sources: list[Source],
    missing: list[tuple[str, str]],
    args: argparse.Namespace,
    fmt: str,
    kwargs: dict,
    state,
) -> int:
    from prefixcap.jobs.output import caption_to_directory
    from prefixcap.model.config import normalize_model_id

    # local folders by absolute path, so that a rerun from another directory recognises its parts
    model = normalize_model_id(args.model)
    generation = {name: value for name, value in kwargs.items() if name != "rerank"}
    settings = {"model": model, "dtype": str(captioner.model.decoder.dtype), "generation": generation}
    if args.rerank:  # reranked parts differ from plain ones (order, scores): a rerun must not mix them
        settings["rerank"] = {"score": args.rerank, "clip": args.rerank_clip}
    summary = caption_to_directory(
        captioner, sources, args.output, state=state, fmt=fmt, part_size=args.part_size,
        batch_size=args.batch_size, num_workers=args.workers, settings=settings, input_failures=missing,
        embed_images=args.embed_images, **kwargs,
    )  # fmt: skip
    if summary is not None:  # the main process
        print(
            f"{summary.captioned} of {summary.images} images captioned ({summary.failed} failed) by "
            f"{summary.processes} process(es) at {summary.images_per_second:.2f} images/s; "
            f"wrote {summary.output}",
            file=sys.stderr,
        )
    return 0  # a non-zero status would make accelerate/torchrun report a crashed job
