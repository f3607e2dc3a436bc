"""Captioning jobs. Into one file: this process captions everything and writes records in input order
(`caption_to_file`). Sharded: every process of an `accelerate launch` (or torchrun) job captions its
share of the parts into part files; the main process then merges them into one results file.

    OUT_DIR/
      parts/part-000007-3f2a9c81d0e4.jsonl   one per part, written atomically by whichever process
      captions.jsonl (or .parquet, .csv, .txt)  one record per captioned image, in input order
      summary.json                            counts, failures with reasons, images/s

A rerun with the same inputs, settings and model files skips the parts that exist, so a killed job
loses at most the part each process was working on. The split is recomputed on every run from the parts still to
do, so a resumed job is balanced over however many processes it now has.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.sources import as_source
from prefixcap.jobs.plan import Part, plan_parts
from prefixcap.jobs.writers import (
    SUFFIXES,
    RecordWriter,
    Result,
    check_output,
    open_output,
    read_part,
    write_errors,
    write_part,
)
from prefixcap.system.atomic import atomic_file
from prefixcap.system.processes import broadcast
from prefixcap.system.terminal import for_terminal

PARTS_DIR = "parts"
SUMMARY = "summary.json"


@dataclass
class Summary:
    output: str  # the merged results file
    images: int  # images found in the inputs: captioned + failed
    captioned: int
    failed: int  # images that could not be read (or a whole shard that could not be)
    processes: int  # processes of this run
    parts: int
    parts_reused: int  # parts finished by an earlier run and not redone
    seconds: float  # this run's captioning time, from the common start to the last process's end
    images_per_second: float  # images this run processed (captioned or failed) per second, all processes
    # {"path", "error"} for each failed image, and for each input that matched nothing
    failures: list[dict[str, str]] = field(default_factory=list)


def caption_to_file(
    captioner: Any,
    sources: Sequence[str],
    out: IO,
    fmt: str,
    *,
    name: str,
    batch_size: int,
    num_workers: int,
    progress: Any = None,
    on_failure: Callable[[ImageLoadError], None] | None = None,
    embed_images: bool = False,
    **generation_kwargs: Any,
) -> list[ImageLoadError]:
    """Caption in this process, writing records to `out` (which `name` names in errors) in input order
    as they come (plain strings are read with `as_source`). Returns the failures, each also passed to
    `on_failure` at once, so that a long run reports them while it goes. The caller opens and closes `out`.
    `embed_images`: Parquet output with the image bytes too (see `RecordWriter`)."""
    writer = RecordWriter(out, fmt, name, embed_images=embed_images)
    # Worker processes, with units of one batch each: every worker decodes a batch while the model
    # captions another.
    results = captioner.stream(
        map(as_source, sources), batch_size=batch_size, workers=num_workers, processes=True, progress=progress,
        **generation_kwargs,
    )  # fmt: skip
    failures = []
    for path, captions in results:
        if isinstance(captions, ImageLoadError):
            failures.append(captions)
            if on_failure is not None:
                on_failure(captions)
        else:
            writer.write(path, captions)
    writer.close()
    return failures


def caption_to_directory(
    captioner: Any,
    sources: Sequence[str],
    out_dir: str | Path,
    *,
    state: Any,
    fmt: str = "jsonl",
    part_size: int = 1000,
    batch_size: int = 32,
    num_workers: int = 4,
    settings: dict[str, Any] | None = None,
    input_failures: Sequence[tuple[str, str]] = (),
    embed_images: bool = False,
    **generation_kwargs: Any,
) -> Summary | None:
    """Caption `sources` (image files and WebDataset shard specs) into `out_dir`.

    Call it in every process, with `state` from `system.processes.process_state()`. Returns the summary on
    the main process and None on the others. `settings` (model, decoding options) and the
    captioner's `model_fingerprint` name the parts (see `plan_parts`), so that a model retrained
    at the same path is not mistaken for the old one; `input_failures` are (input, reason) pairs
    for inputs that matched nothing or could not be read, listed in the summary with the
    unreadable images. `embed_images` (Parquet) reads each image again from its source while the
    parts are merged, so that part files stay small and a resumed job need not redo any part.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {**(settings or {}), "model_files": captioner.model_fingerprint}
    parts = plan_parts(sources, part_size=part_size, settings=settings)

    # 1. The main process decides what is left to do, so that every process splits the same list
    #    even on a file system whose views differ a little between machines. The broadcast is
    #    also the common start line for the timing: nothing is written before it.
    todo_indices: list[list[int]] = [[]]
    if state.is_main_process:
        for unfinished in (out_dir / PARTS_DIR).glob(".part-*.tmp"):  # left by a killed run
            unfinished.unlink()
        todo_indices = [[part.index for part in parts if not _part_path(out_dir, part).exists()]]
    broadcast(todo_indices, state)
    todo = [parts[index] for index in todo_indices[0]]
    mine = todo[state.process_index :: state.num_processes]
    start = time.perf_counter()

    # 2. Caption this process's parts, writing each one as soon as it is complete.
    rank, done = state.process_index, 0
    known_total = None if any(part.is_shard for part in mine) else sum(len(part.sources) for part in mine)
    with tqdm(total=known_total, desc=f"rank {rank}", unit="img", position=rank, disable=None) as bar:
        for index, outcomes in captioner.caption_units(
            [part.sources for part in mine], batch_size=batch_size, workers=num_workers, progress=bar,
            **generation_kwargs,
        ):  # fmt: skip
            write_part(_part_path(out_dir, mine[index]), [Result.of(path, outcome) for path, outcome in outcomes])
            done += len(outcomes)
            for _, outcome in outcomes:
                if isinstance(outcome, ImageLoadError):
                    tqdm.write(for_terminal(f"error: {outcome}"), file=sys.stderr)
    seconds = time.perf_counter() - start
    print(f"rank {rank}: {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} images/s)", file=sys.stderr)

    # 3. Once every process is done, the main process merges the parts, in input order.
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    seconds = time.perf_counter() - start
    output = out_dir / f"captions{SUFFIXES[fmt]}"
    redone = {part.index for part in todo}
    captioned, failures, processed = _merge(out_dir, parts, output, fmt, redone=redone, embed_images=embed_images)
    summary = Summary(
        output=str(output), images=captioned + len(failures), captioned=captioned, failed=len(failures),
        processes=state.num_processes, parts=len(parts), parts_reused=len(parts) - len(todo),
        seconds=round(seconds, 3), images_per_second=round(processed / max(seconds, 1e-9), 3),
        failures=[{"path": source, "error": reason} for source, reason in input_failures] + failures,
    )  # fmt: skip
    with write_errors(out_dir / SUMMARY), atomic_file(out_dir / SUMMARY) as out:
        json.dump(asdict(summary), out, indent=2)
    return summary


def prepare_directory(out_dir: str | Path, fmt: str, inputs: Sequence[str]) -> None:
    """Create `out_dir`, and fail now (before a model loads) if the job could not write its files
    there, or would replace one of its `inputs`."""
    out_dir = Path(out_dir)
    with write_errors(out_dir):
        (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    check_output([out_dir / f"captions{SUFFIXES[fmt]}", out_dir / SUMMARY], inputs)


def _part_path(out_dir: Path, part: Part) -> Path:
    return out_dir / PARTS_DIR / part.filename


def _merge(
    out_dir: Path, parts: Sequence[Part], output: Path, fmt: str, *, redone: set[int], embed_images: bool = False
) -> tuple[int, list[dict[str, str]], int]:
    """Write the good results of all `parts` to `output`, in order. Returns (images captioned,
    failures, images in the `redone` parts)."""
    captioned, failures, processed = 0, [], 0
    with open_output(output, fmt) as out:
        writer = RecordWriter(out, fmt, str(output), embed_images=embed_images)
        for part in parts:
            path = _part_path(out_dir, part)
            if not path.exists():
                raise UserError(
                    f"{path}: missing after every process finished; with several machines, "
                    "--output must be a folder that all of them share"
                )
            for result in read_part(path):
                if result.captions is None:
                    failures.append({"path": result.path, "error": result.error})
                else:
                    writer.write(result.path, result.ranked)
                    captioned += 1
                processed += part.index in redone
        writer.close()
    return captioned, failures, processed
