"""`prefixcap caption`: caption image files, folders and globs."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path
from typing import Iterator, TextIO

from prefixcap.cli.common import (
    add_generation_arguments,
    add_model_arguments,
    check_generation,
    generation_kwargs,
    load_captioner,
)
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.images import IMAGE_EXTENSIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption images",
        description="Caption image files, folders (searched recursively) and glob patterns. "
        "Unreadable images are reported on stderr as 'error: PATH: REASON' and skipped; "
        "the exit status is 1 if any image failed.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob pattern")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.add_argument(
        "--format",
        choices=["text", "jsonl", "csv"],
        default="text",
        help="text: 'path<TAB>caption' lines; jsonl: {path, caption, captions}; csv: path,caption,... (default: text)",
    )
    parser.add_argument("--output", type=Path, help="write results to this file instead of stdout")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding images ahead of the model (default: 4)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kwargs = generation_kwargs(args)
    paths, failures = expand_paths(args.paths)
    for path, reason in failures:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if not paths:
        raise UserError("no images found in the given paths")
    captioner = load_captioner(args)
    check_generation(captioner.model.config.generation, kwargs)
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        failed = _caption_to(out, captioner, paths, args, kwargs)
    finally:
        if args.output:
            out.close()
    return 1 if failed or failures else 0


def _caption_to(out: TextIO, captioner, paths: list[str], args: argparse.Namespace, kwargs: dict) -> int:
    from tqdm import tqdm

    writer = _RecordWriter(out, args.format)
    show_progress = sys.stderr.isatty() and len(paths) > args.batch_size
    failed = 0
    stream = captioner.stream(paths, batch_size=args.batch_size, num_workers=args.workers, **kwargs)
    for path, captions in tqdm(stream, total=len(paths), unit="img", disable=not show_progress, file=sys.stderr):
        if isinstance(captions, ImageLoadError):
            failed += 1
            tqdm.write(f"error: {captions}", file=sys.stderr)
        else:
            writer.write(path, captions)
    return failed


class _RecordWriter:
    """One record per image, in input order, flushed as it goes so a crash loses nothing written."""

    def __init__(self, out: TextIO, fmt: str):
        self.out, self.fmt = out, fmt
        self.csv = csv.writer(out) if fmt == "csv" else None
        self.header_written = False

    def write(self, path: str, captions: list[str]) -> None:
        if self.fmt == "text":
            self.out.write("\t".join([path, *captions]) + "\n")
        elif self.fmt == "jsonl":
            self.out.write(json.dumps({"path": path, "caption": captions[0], "captions": captions}) + "\n")
        else:
            if not self.header_written:
                self.csv.writerow(["path", "caption", *[f"caption_{i + 2}" for i in range(len(captions) - 1)]])
                self.header_written = True
            self.csv.writerow([path, *captions])
        self.out.flush()


def expand_paths(patterns: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files as given, folders searched recursively for image extensions, globs expanded.
    Returns (image paths in a stable order without duplicates, [(pattern, reason)] for misses)."""
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
    elif glob.has_magic(pattern):
        for match in sorted(glob.glob(pattern, recursive=True)):
            yield from _expand_one(match) if Path(match).is_dir() else [match]
