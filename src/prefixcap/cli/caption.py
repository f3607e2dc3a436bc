"""`prefixcap caption`: caption image files, folders, globs and WebDataset shards, in one process
or split over many (`accelerate launch -m prefixcap caption ... --output OUT_DIR/`)."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from prefixcap.cli.common import (
    add_generation_arguments,
    add_jpeg_draft_argument,
    add_model_arguments,
    at_least,
    check_generation,
    generation_kwargs,
    load_captioner,
)
from prefixcap.distributed.outputs import FORMATS
from prefixcap.distributed.plan import is_remote
from prefixcap.errors import UserError
from prefixcap.images import IMAGE_EXTENSIONS

EPILOG = """\
output:
  By default one file (--output FILE) or stdout. A folder instead (OUT_DIR/captions.<format>,
  OUT_DIR/summary.json and OUT_DIR/parts/) when --output is an existing folder or ends with "/",
  and always when several processes run. A rerun into the same folder skips the parts that are
  already finished, so a killed job loses at most one part per process.

examples:
  prefixcap caption photos/ 'more/*.png' > captions.txt
  prefixcap caption 'shards/train-{000..099}.tar' --output out/ --format parquet
  accelerate launch --multi_gpu --num_processes 8 -m prefixcap caption shards/*.tar --output out/
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption images",
        description="Caption image files, folders (searched recursively), glob patterns and WebDataset "
        "shards (local .tar files, URLs, 'pipe:' commands, brace patterns like shard-{000..099}.tar). "
        "Unreadable images are reported on stderr as 'error: PATH: REASON' and skipped; "
        "the exit status is 1 if any image failed, except with folder output, where failures are "
        "expected at scale and counted in summary.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder, glob pattern or WebDataset shard")
    add_model_arguments(parser)
    add_jpeg_draft_argument(parser)
    add_generation_arguments(parser)
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="text: 'path<TAB>caption' lines; jsonl: {path, caption, captions}; csv: path,caption,...; "
        "parquet: columns path, caption, captions (default: text, or jsonl into a folder)",
    )
    parser.add_argument("--output", help="write results to this file, or into this folder (see 'output' below)")
    parser.add_argument(
        "--workers", type=at_least(int, 0), default=min(4, os.cpu_count() or 1),
        help="DataLoader processes decoding images ahead of the model, per process; 0 decodes in the "
        "main process (default: 4, or the number of CPUs if fewer)",
    )  # fmt: skip
    parser.add_argument(
        "--part-size", type=at_least(int, 1), default=1000,
        help="folder output: images per part file, the unit of work and of resuming; each WebDataset "
        "shard is one part (default: 1000)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    kwargs = generation_kwargs(args)
    state = PartialState(cpu=not torch.cuda.is_available())
    to_folder = _writes_folder(args.output, state.num_processes)
    fmt = args.format or ("jsonl" if to_folder else "text")
    if fmt == "parquet" and not args.output:
        raise UserError("parquet output needs --output FILE or --output FOLDER/")
    sources, missing = expand_paths(args.paths)
    if state.is_main_process:
        for path, reason in missing:
            print(f"error: {path}: {reason}", file=sys.stderr)
    if not sources:
        raise UserError("no images found in the given paths")
    if args.device is None and state.num_processes > 1:
        args.device = str(state.device)  # each process on its own GPU
    captioner = load_captioner(args, jpeg_draft=args.jpeg_draft)
    check_generation(captioner.model, kwargs)
    if to_folder:
        return _caption_to_folder(captioner, sources, missing, args, fmt, kwargs, state)
    failed = _caption_to_file(captioner, sources, args, fmt, kwargs)
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


def _caption_to_file(captioner, sources: list[str], args: argparse.Namespace, fmt: str, kwargs: dict) -> int:
    """Caption in this process, writing records in input order as they come. Returns the number of failures."""
    from tqdm import tqdm

    from prefixcap.distributed.loading import caption_parts, in_input_order
    from prefixcap.distributed.outputs import RecordWriter, open_output
    from prefixcap.distributed.plan import plan_parts

    # Parts of one batch each: every worker decodes a batch while the model captions another.
    parts = plan_parts(sources, part_size=args.batch_size)
    total = None if any(part.is_shard for part in parts) else len(sources)
    show_progress = sys.stderr.isatty() and (total is None or total > args.batch_size)
    out = open_output(args.output, fmt) if args.output else sys.stdout
    failed = 0
    try:
        writer = RecordWriter(out, fmt)
        with tqdm(total=total, unit="img", disable=not show_progress, file=sys.stderr) as bar:
            done = caption_parts(
                captioner, parts, batch_size=args.batch_size, num_workers=args.workers, progress=bar, **kwargs
            )
            for result in in_input_order(done):
                if result.captions is None:
                    failed += 1
                    tqdm.write(f"error: {result.path}: {result.error}", file=sys.stderr)
                else:
                    writer.write(result.path, result.captions)
        writer.close()
    finally:
        if args.output:
            out.close()
    return failed


def _caption_to_folder(
    captioner,
    sources: list[str],
    missing: list[tuple[str, str]],
    args: argparse.Namespace,
    fmt: str,
    kwargs: dict,
    state,
) -> int:
    from prefixcap.distributed.job import caption_to_directory
    from prefixcap.features import normalize_model_id

    # local folders by absolute path, so that a rerun from another directory recognises its parts
    model = normalize_model_id(args.model)
    settings = {"model": model, "dtype": str(captioner.model.decoder.dtype), "generation": kwargs}
    summary = caption_to_directory(
        captioner, sources, args.output, state=state, fmt=fmt, part_size=args.part_size,
        batch_size=args.batch_size, num_workers=args.workers, settings=settings, input_failures=missing, **kwargs,
    )  # fmt: skip
    if summary is not None:  # the main process
        print(
            f"{summary.captioned} of {summary.images} images captioned ({summary.failed} failed) by "
            f"{summary.processes} process(es) at {summary.images_per_second:.2f} images/s; "
            f"wrote {summary.output}",
            file=sys.stderr,
        )
    return 0  # a non-zero status would make accelerate/torchrun report a crashed job


def expand_paths(patterns: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files as given, folders searched recursively for image extensions, globs expanded, and
    WebDataset shards: tar files, URLs and `pipe:` commands, with brace patterns
    (`shard-{000..099}.tar`) and `::` lists expanded as webdataset does.
    Returns (inputs in a stable order without duplicates, [(pattern, reason)] for misses)."""
    paths: dict[str, None] = {}
    missing = []
    for pattern in patterns:
        found = list(_expand_one(pattern))
        if not found:
            missing.append((pattern, "no such file or directory" if not glob.has_magic(pattern) else "no match"))
        paths.update(dict.fromkeys(found))
    return list(paths), missing


def _expand_one(pattern: str) -> Iterator[str]:
    path = Path(pattern)
    if path.is_dir():
        yield from sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    elif path.exists():
        yield pattern  # an explicit file is tried whatever its extension
    elif is_remote(pattern):
        yield from _expand_braces(pattern)  # remote shards are only opened when their turn comes
    elif (names := _expand_braces(pattern)) != [pattern]:
        for name in names:
            yield from _expand_one(name)
    elif glob.has_magic(pattern):
        for match in sorted(glob.glob(pattern, recursive=True)):
            yield from _expand_one(match) if Path(match).is_dir() else [match]


def _expand_braces(pattern: str) -> list[str]:
    if "{" not in pattern and "::" not in pattern:
        return [pattern]
    from webdataset.shardlists import expand_urls

    return expand_urls(pattern)
