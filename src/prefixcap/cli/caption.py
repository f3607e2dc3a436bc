"""`prefixcap caption`: caption image files, folders, globs and WebDataset shards, in one process
or split over many (`accelerate launch -m prefixcap caption ... --output OUT_DIR/`)."""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

from prefixcap.cli.common import (
    add_generation_arguments,
    add_jpeg_draft_argument,
    add_model_arguments,
    bounded,
    check_generation,
    generation_kwargs,
    load_captioner,
)
from prefixcap.distributed.outputs import FORMATS
from prefixcap.distributed.plan import LocalPath, RemoteShard, Source, as_source, file_identity
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
        "Folders and '**' globs follow symlinked folders, each real folder once, and each file is "
        "captioned once however it was reached. Names found on disk are always opened as files. "
        "Unreadable images and folders are reported on stderr as 'error: PATH: REASON' and skipped; "
        "the exit status is 1 if any failed, except with folder output, where failures are "
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
        help="text: 'path<TAB>caption' lines, with backslash, tab and newline escaped as \\\\, \\t, \\n; "
        "jsonl: {path, caption, captions}; csv: path,caption,...; parquet: columns path, caption, "
        "captions (default: text, or jsonl into a folder)",
    )
    parser.add_argument("--output", help="write results to this file, or into this folder (see 'output' below)")
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
    _check_output(args.output, to_folder, fmt, sources)  # before the model loads
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


def _check_output(output: str | None, to_folder: bool, fmt: str, sources: list[Source]) -> None:
    from prefixcap.distributed.job import prepare_directory
    from prefixcap.distributed.outputs import check_output

    if to_folder:
        prepare_directory(output, fmt, sources)
    elif output is not None:
        check_output([Path(output)], sources)


def _caption_to_file(captioner, sources: list[Source], args: argparse.Namespace, fmt: str, kwargs: dict) -> int:
    """Caption in this process, writing records in input order as they come; a file appears only
    once complete. Returns the number of failures."""
    from tqdm import tqdm

    from prefixcap.distributed.loading import caption_parts, in_input_order
    from prefixcap.distributed.outputs import RecordWriter, open_output
    from prefixcap.distributed.plan import plan_parts

    # Parts of one batch each: every worker decodes a batch while the model captions another.
    parts = plan_parts(sources, part_size=args.batch_size)
    total = None if any(part.is_shard for part in parts) else len(sources)
    show_progress = sys.stderr.isatty() and (total is None or total > args.batch_size)
    failed = 0
    with open_output(args.output, fmt) if args.output else nullcontext(sys.stdout) as out:
        writer = RecordWriter(out, fmt, args.output or "<stdout>")
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
    return failed


def _caption_to_folder(
    captioner,
    sources: list[Source],
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


def expand_paths(patterns: list[str]) -> tuple[list[Source], list[tuple[str, str]]]:
    """Files as given, folders searched recursively for image extensions, globs expanded, and
    WebDataset shards: tar files, URLs and `pipe:` commands, with brace patterns
    (`shard-{000..099}.tar`) and `::` lists expanded as webdataset does.

    Only a pattern itself (or a name its braces expand to) can be a URL or `pipe:` command, and
    only when no file or folder has that name: every name found on disk is a `LocalPath`.
    Returns (inputs in a stable order, each file once however it was reached, and
    [(pattern or folder, reason)] for patterns that matched nothing and folders that could not
    be read)."""
    finder = _Finder()
    sources: dict[object, Source] = {}
    for pattern in patterns:
        problems = len(finder.problems)
        found = list(_expand_one(pattern, finder))
        if not found and len(finder.problems) == problems:
            finder.problems[pattern] = _nothing_found(pattern)
        for source in found:
            sources.setdefault(file_identity(source) or source, source)
    return list(sources.values()), list(finder.problems.items())


def _expand_one(pattern: str, finder: _Finder) -> Iterator[Source]:
    source = as_source(pattern)
    if isinstance(source, RemoteShard):
        yield from map(RemoteShard, _expand_braces(pattern))  # remote shards are only opened when their turn comes
    elif os.path.isdir(pattern):
        yield from finder.images(pattern)
    elif os.path.lexists(pattern):
        yield source  # an explicit file is tried whatever its extension
    elif (names := _expand_braces(pattern)) != [pattern]:
        for name in names:
            yield from _expand_one(name, finder)
    elif glob.has_magic(pattern):
        for match in finder.glob(pattern):
            yield from finder.images(match) if os.path.isdir(match) else [match]


def _nothing_found(pattern: str) -> str:
    if os.path.isdir(pattern):
        return "no images in this folder"
    return "no match" if glob.has_magic(pattern) else "no such file or directory"


def _expand_braces(pattern: str) -> list[str]:
    if "{" not in pattern and "::" not in pattern:
        return [pattern]
    from webdataset.shardlists import expand_urls

    return expand_urls(pattern)


class _Finder:
    """Finds files on disk; every name it returns is a `LocalPath`. Symlinked folders are
    followed, but each walk reads a real folder once, so that symlink loops neither hang nor
    repeat images; a folder that cannot be read goes into `problems`, not skipped in silence."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}  # folder -> why it could not be read

    def images(self, top: str) -> list[LocalPath]:
        """The image files in folder `top` and all its subfolders, sorted."""
        top = str(Path(top))  # named as pathlib names them: "photos/a.jpg" for "photos//", "a.jpg" for "."
        return sorted(
            LocalPath(os.path.join(folder, entry.name))
            for folder, entries in self._walk("" if top == os.curdir else top, hidden=True)
            for entry in entries
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _is(entry.is_file)
        )

    def glob(self, pattern: str) -> list[LocalPath]:
        """Like `glob.glob(pattern, recursive=True)`, sorted, where `**` (any depth of folders)
        visits each real folder once."""
        base = os.sep if pattern.startswith(os.sep) else ""
        return sorted(map(LocalPath, self._match(base, [part for part in pattern.split(os.sep) if part])))

    def _match(self, base: str, parts: list[str]) -> Iterator[str]:
        """The paths below folder `base` ("" for the working folder) that match the components `parts`."""
        head, rest = parts[0], parts[1:]
        if head == "**":
            if not rest:  # `dir/**`: the folder, which is then searched whole
                yield base or os.curdir
                return
            for folder, _ in self._walk(base, hidden=False):
                yield from self._match(folder, rest)
        elif glob.has_magic(head):
            for entry in self._entries(base) or []:
                if fnmatch.fnmatch(entry.name, head) and (head.startswith(".") or not entry.name.startswith(".")):
                    path = os.path.join(base, entry.name)
                    if not rest:
                        yield path
                    elif _is(entry.is_dir):
                        yield from self._match(path, rest)
        else:
            path = os.path.join(base, head)
            if not rest:
                if os.path.lexists(path):
                    yield path
            elif os.path.isdir(path):
                yield from self._match(path, rest)

    def _walk(self, top: str, *, hidden: bool) -> Iterator[tuple[str, list[os.DirEntry]]]:
        """(folder, its entries) for `top` and every readable folder below it, symlinked or not,
        each real folder once. `hidden`: also enter folders whose names start with "."."""
        seen: set[tuple[int, int]] = set()
        stack = [top]
        while stack:
            folder = stack.pop()
            identity = file_identity(folder or os.curdir)
            if identity in seen or (entries := self._entries(folder)) is None:
                continue
            if identity is not None:
                seen.add(identity)
            yield folder, entries
            subfolders = [e for e in entries if (hidden or not e.name.startswith(".")) and _is(e.is_dir)]
            stack.extend(os.path.join(folder, entry.name) for entry in reversed(subfolders))  # sorted, depth first

    def _entries(self, folder: str) -> list[os.DirEntry] | None:
        """The entries of `folder` ("" for the working folder) sorted by name, or None (and a
        problem noted) if it cannot be read."""
        try:
            with os.scandir(folder or os.curdir) as listing:
                return sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            self.problems[folder or os.curdir] = f"cannot read this folder ({error.strerror or error})"
            return None


def _is(test: Callable[[], bool]) -> bool:
    """`DirEntry.is_file` or `.is_dir` (through links), False where the entry cannot be examined."""
    try:
        return test()
    except OSError:
        return False
