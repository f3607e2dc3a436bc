"""Caption into a folder, split over every process of an `accelerate launch` (or torchrun) job: each
process captions its share of the parts into part files; the main process then merges them into
one results file.

    OUT_DIR/
      parts/part-000007-3f2a9c81d0e4.jsonl   one per part, written atomically by whichever process
      captions.jsonl (or .parquet, .csv, .txt)  one record per captioned image, in input order
      summary.json                            counts, failures with reasons, images/s

A rerun with the same inputs, settings and model files skips the parts that exist, so a killed job
loses at most the part each process was working on. The split is recomputed on every run from the
parts still to do, so a resumed job is balanced over however many processes it now has.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.errors import ImageLoadError, UserError
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
from prefixcap.model.config import normalize_model_id
from prefixcap.options import CaptionRequest
from prefixcap.system.atomic import atomic_file
from prefixcap.system.processes import broadcast

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


def caption_to_folder(
    captioner: Any,
    sources: Sequence[str],
    out_dir: str | Path,
    request: CaptionRequest,
    *,
    model: str | Path,
    state: Any,
    fmt: str = "jsonl",
    part_size: int = 1000,
    batch_size: int = 32,
    num_workers: int = 4,
    input_failures: Sequence[tuple[str, str]] = (),
    embed_images: bool = False,
    on_failure: Callable[[ImageLoadError], None] | None = None,
) -> Summary | None:
    """Caption `sources` (image files and WebDataset shard specs) into `out_dir` with `request`.

    Call it in every process, with `state` from `system.processes.process_state()`. Returns the
    summary on the main process and None on the others. The parts are named by the settings that
    make their results (`part_settings`: the model named `model`, its files, precision and the
    request), so that a rerun with other settings, or a model retrained at the same path, redoes
    them; `input_failures` are (input, reason) pairs for inputs that matched nothing or could not
    be read, listed in the summary with the unreadable images, which `on_failure` also sees as they
    are found. `embed_images` (Parquet) reads each image again from its source while the parts are
    merged, so that part files stay small and a resumed job need not redo any part.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    precision = {"dtype": str(captioner.model.decoder.dtype)}
    settings = part_settings(model, captioner.model_fingerprint, precision, request)
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
        loop = captioner.loop(
            request, batch_size=batch_size, workers=num_workers, processes=True, progress=bar, on_failure=on_failure
        )
        for index, outcomes in loop.run([part.sources for part in mine]):
            write_part(_part_path(out_dir, mine[index]), [Result.of(path, outcome) for path, outcome in outcomes])
            done += len(outcomes)
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


def part_settings(
    model: str | Path, model_files: str | None, precision: dict[str, Any], request: CaptionRequest
) -> dict[str, Any]:
    """What a part's results depend on besides its images: the model (by the name given, a folder
    by its absolute path so that a rerun from another folder recognises its parts), its files
    (`model_fingerprint`), how it runs (`precision`: dtype, quantization, ...), and the request's
    options, reranker and retrieval (its datastore's files)."""
    settings: dict[str, Any] = {
        "model": normalize_model_id(model),
        "model_files": model_files,
        **precision,
        "generation": {**asdict(request.generation), **asdict(request.text)},
    }
    if request.rerank is not None:  # reranked parts differ from plain ones (order, scores): never mix them
        scorer = getattr(request.rerank, "model", None)
        settings["rerank"] = [type(request.rerank).__qualname__, str(getattr(scorer, "name_or_path", ""))]
    if request.retrieval is not None:  # another datastore gives other prompts, so other captions
        settings["retrieval"] = request.retrieval.settings()
    return settings


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
            # A part of image sources lists them in order: write each result under its source, whose
            # type says how its image is read again (a Parquet row allowed outside its folder, ...).
            sources = iter(part.sources if not part.is_shard else [])
            for result in read_part(path):
                source = next(sources, result.path)
                if result.captions is None:
                    failures.append({"path": result.path, "error": result.error})
                else:
                    writer.write(source, result.ranked)
                    captioned += 1
                processed += part.index in redone
        writer.close()
    return captioned, failures, processed
