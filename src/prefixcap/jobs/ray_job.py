"""A captioning job on a Ray cluster, into a folder of output shards:

    OUT_DIR/
      parts/part-000007-3f2a9c81d0e4.parquet  one per part (--part-size images, or one WebDataset shard),
                                              in input order: path, caption, captions, error; or .jsonl
      summary.json                            counts, every failure with its reason, images/s

The parts are planned as a local folder job plans them (`prefixcap.jobs.plan`): named by their
position and a hash of their images, the settings and the model's files. A part's file is
written, atomically, by this process as soon as the cluster has captioned all its images
(`RayCaptioner.caption_units`); a retried part writes the same name with the same content. A
rerun skips the parts whose file exists, so a killed job loses only the parts in flight, and a
model saved again at the same path redoes them all. Once every part of the job is written, the
part files of earlier runs with other inputs or settings are removed, so that the folder holds
this job's results only.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefixcap.errors import ImageLoadError
from prefixcap.jobs.plan import plan_parts
from prefixcap.jobs.ray import RayCaptioner
from prefixcap.jobs.to_folder import PARTS_DIR, SUMMARY, Summary, part_settings
from prefixcap.jobs.writers import Result, printable, read_part, require_format, write_errors, write_part
from prefixcap.options import CaptionRequest
from prefixcap.system.atomic import atomic_file, atomic_path

SHARD_FORMATS = ("jsonl", "parquet")
# The part files a job writes (`Part.filename`, with the format's suffix), and their temporaries.
_PART_FILE = re.compile(r"^part-\d{6}-[0-9a-f]{12}\.(jsonl|parquet)$")
_PART_TEMPORARY = re.compile(r"^\.part-\d{6}-[0-9a-f]{12}\.(jsonl|parquet)\.[A-Za-z0-9_]{8}\.tmp$")


@dataclass
class RaySummary(Summary):
    """`Summary`'s fields, with `processes` the captioning actors, and `seconds` (and so
    `images_per_second`) this run's whole time on the cluster: joining or starting it, starting
    the actors and loading their models included."""

    images_this_run: int = 0  # images the cluster captioned (or found unreadable) in this run
    format: str = "jsonl"


def caption_to_shards(
    captioner: RayCaptioner,
    sources: Sequence[str],
    out_dir: str | Path,
    request: CaptionRequest,
    *,
    fmt: str = "parquet",
    part_size: int = 1000,
    batch_size: int | None = None,
    input_failures: Sequence[tuple[str, str]] = (),
    progress: Any = None,
    on_failure: Callable[[ImageLoadError], None] | None = None,
) -> RaySummary:
    """Caption `sources` (typed names from `expand_inputs`) with `request` on the cluster into
    `out_dir` (see the module's docstring); `input_failures` are (input, reason) pairs for inputs
    that matched nothing, listed in the summary with the unreadable images; `progress` gets
    `update(n)`, and `on_failure` each unreadable image as it comes back."""
    if fmt not in SHARD_FORMATS:
        raise ValueError(f"Ray jobs write {' or '.join(SHARD_FORMATS)} shards, not {fmt!r}")
    require_format(fmt)
    parts_dir = Path(out_dir) / PARTS_DIR
    with write_errors(parts_dir):
        parts_dir.mkdir(parents=True, exist_ok=True)
    _remove(parts_dir, _PART_TEMPORARY)  # left by a killed run
    precision = {
        "dtype": captioner.dtype, "quantize": captioner.quantize,
        "device": captioner.device or ("cuda" if captioner.gpus_per_actor else "cpu"),
        "jpeg_draft": captioner.jpeg_draft, "max_pixels": captioner.max_pixels,
    }  # fmt: skip
    parts = plan_parts(
        sources,
        part_size=part_size,
        settings=part_settings(captioner.model, captioner.model_fingerprint, precision, request),
    )
    paths = [parts_dir / Path(part.filename).with_suffix(f".{fmt}") for part in parts]
    todo = [index for index, path in enumerate(paths) if not path.exists()]

    start, processed = time.perf_counter(), 0
    units = [parts[index].sources for index in todo]
    loop = captioner.loop(request, batch_size=batch_size, progress=progress, on_failure=on_failure)
    for unit, outcomes in loop.run(units):
        write_shard(paths[todo[unit]], [Result.of(key, outcome) for key, outcome in outcomes], fmt)
        processed += len(outcomes)
    seconds = time.perf_counter() - start

    captioned, failures = 0, [{"path": source, "error": reason} for source, reason in input_failures]
    for path in paths:
        for result in read_shard(path, fmt):
            if result.error is None:
                captioned += 1
            else:
                failures.append({"path": result.path, "error": result.error})
    _remove(parts_dir, _PART_FILE, keep={path.name for path in paths})
    summary = RaySummary(
        output=str(parts_dir), images=captioned + len(failures) - len(input_failures), captioned=captioned,
        failed=len(failures) - len(input_failures), processes=captioner.actors, parts=len(parts),
        parts_reused=len(parts) - len(todo), seconds=round(seconds, 3),
        images_per_second=round(processed / max(seconds, 1e-9), 3), failures=failures, images_this_run=processed,
        format=fmt,
    )  # fmt: skip
    with write_errors(Path(out_dir) / SUMMARY), atomic_file(Path(out_dir) / SUMMARY) as out:
        json.dump(asdict(summary), out, indent=2)
    return summary


def write_shard(path: Path, results: Sequence[Result], fmt: str) -> None:
    """One part's results, atomically: JSON lines as local part files are, or Parquet with the
    columns path, caption, captions (best first) and error (null for a captioned image)."""
    if fmt == "jsonl":
        write_part(path, results)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("path", pa.string()), ("caption", pa.string()), ("captions", pa.list_(pa.string())), ("error", pa.string())]
    )
    rows = [
        {"path": printable(result.path), "caption": result.captions[0] if result.captions else None,
         "captions": result.captions, "error": result.error}
        for result in results
    ]  # fmt: skip
    with write_errors(path), atomic_path(path) as staging:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), staging)


def read_shard(path: Path, fmt: str) -> list[Result]:
    """The results a part file holds (captions only where the summary needs them: not for Parquet)."""
    if fmt == "jsonl":
        return list(read_part(path))
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["path", "error"])
    return [Result(row["path"], None if row["error"] else [], row["error"]) for row in table.to_pylist()]


def _remove(folder: Path, pattern: re.Pattern, keep: set[str] = frozenset()) -> None:
    """Delete the regular files of `folder` whose names match `pattern` (names this module
    writes), except `keep`."""
    for entry in folder.iterdir():
        if pattern.match(entry.name) and entry.name not in keep and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
