"""`prefixcap caption --sidecar / --sidecar-dir`: the options, and the run that writes one caption
file per image (the work itself is `prefixcap.jobs.sidecar`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.system.terminal import for_terminal

EPILOG = """\
sidecar captions (training sets for image generators):
  --sidecar writes photos/dog_01.txt next to photos/dog_01.png, in every subfolder; --sidecar-dir OUT
  writes OUT/dog_01.txt instead, mirroring each input folder's tree (for read-only image folders).
  An image whose caption file exists is not captioned again (--existing skip), so a rerun after an
  interruption continues where it stopped; every file is written whole or not at all. With
  --num-captions N a file holds N captions, one per line. The last line on stderr counts the files
  written, skipped and failed; the exit status is 1 if an image could not be read.
"""


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    from prefixcap.jobs.sidecar import EXISTING, SEPARATOR

    group = parser.add_argument_group("sidecar captions (one IMAGE.txt per image, for training sets)")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--sidecar", action="store_true",
        help="write each image's caption to a UTF-8 .txt file of the same name beside it (photo_001.png -> "
        "photo_001.txt), in the folders given and all their subfolders",
    )  # fmt: skip
    where.add_argument(
        "--sidecar-dir", metavar="OUT",
        help="like --sidecar, but write the .txt files under OUT, at each image's path relative to the input "
        "folder it was found in; the image folders are only read",
    )  # fmt: skip
    group.add_argument(
        "--existing", choices=EXISTING,
        help="when an image's .txt exists: skip (default) leaves it and does not caption the image, so reruns "
        "continue where they stopped; overwrite replaces it; append / prepend add the new caption after / "
        f"before its text, joined by {SEPARATOR!r} (on every run: a rerun appends again)",
    )  # fmt: skip
    group.add_argument(
        "--dry-run", action="store_true",
        help="print each .txt that would be written with its text (or 'skip'), and change no file",
    )  # fmt: skip


def sidecar_requested(args: argparse.Namespace) -> bool:
    """Whether this run writes sidecar files; refuses the options that do not go with that choice."""
    sidecar = args.sidecar or args.sidecar_dir is not None
    if not sidecar:
        for flag, value in (("--existing", args.existing), ("--dry-run", args.dry_run)):
            if value:
                raise UserError(f"{flag} applies to caption files: add --sidecar or --sidecar-dir OUT")
        return False
    flag = "--sidecar" if args.sidecar else "--sidecar-dir"
    for other, value in (("--output", args.output), ("--format", args.format)):
        if value is not None:
            raise UserError(f"{flag} writes one .txt per image; it cannot be combined with {other}")
    return True


def run_sidecars(args: argparse.Namespace, state: Any, load: Callable[[], tuple[Any, Any]]) -> int:
    """Plan (before the model loads, which `load` does only if an image needs a caption: it gives
    the captioner and the checked request), caption, write, and print the summary. Exit status 1
    if any image or input failed."""
    from tqdm import tqdm

    from prefixcap.jobs.sidecar import SidecarSummary, caption_sidecars, plan_sidecars

    if state.num_processes > 1:
        raise UserError("--sidecar runs in one process; start one job per folder to use several GPUs")
    existing = args.existing or "skip"
    plan = plan_sidecars(args.paths, out_dir=args.sidecar_dir, existing=existing)
    for path, reason in plan.missing:
        print(for_terminal(f"error: {path}: {reason}"), file=sys.stderr)
    for _, failure in plan.refused:
        print(for_terminal(f"error: {failure}"), file=sys.stderr)
    if not plan.todo and not plan.skipped and not plan.refused:
        raise UserError("no images found in the given paths")
    if args.dry_run:
        for sidecar in plan.skipped:
            print(for_terminal(f"skip  {sidecar.path} (exists)"))

    def report(sidecar, outcome: str | ImageLoadError) -> None:
        if isinstance(outcome, ImageLoadError):
            tqdm.write(for_terminal(f"error: {outcome}"), file=sys.stderr)
        elif args.dry_run:
            tqdm.write(for_terminal(f"write {sidecar.path}: {outcome.replace(chr(10), chr(92) + 'n')}"))

    summary = SidecarSummary(dry_run=args.dry_run)
    if plan.todo:
        captioner, request = load()
        show_progress = sys.stderr.isatty() and len(plan.todo) > args.batch_size
        with tqdm(total=len(plan.todo), unit="img", disable=not show_progress, file=sys.stderr) as bar:
            summary = caption_sidecars(
                captioner, plan.todo, request, existing=existing, dry_run=args.dry_run, batch_size=args.batch_size,
                num_workers=args.workers, progress=bar, on_result=report,
            )  # fmt: skip
    summary.skipped = len(plan.skipped)
    summary.failed += len(plan.refused)
    print(summary, file=sys.stderr)
    return 1 if summary.failed or plan.missing else 0
