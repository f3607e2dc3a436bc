"""Caption into one file (or stdout), in this process: the records of good images in input order, as
the caption loop delivers them (text, JSON lines, CSV or Parquet: `jobs.writers`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any

from prefixcap.errors import ImageLoadError
from prefixcap.inputs.sources import as_source
from prefixcap.jobs.writers import RecordWriter
from prefixcap.options import CaptionRequest


def caption_to_file(
    captioner: Any,
    sources: Sequence[str],
    out: IO,
    fmt: str,
    request: CaptionRequest,
    *,
    name: str,
    batch_size: int,
    num_workers: int,
    progress: Any = None,
    on_failure: Callable[[ImageLoadError], None] | None = None,
    embed_images: bool = False,
) -> int:
    """Caption with `request` in this process, writing records to `out` (which `name` names in
    errors) in input order as they come (plain strings are read with `as_source`). Returns the
    number of images that could not be read, each passed to `on_failure` as it is found (none is
    kept: a long run's failures would hold memory). The caller opens and closes `out`.
    `embed_images`: Parquet output with the image bytes too (see `RecordWriter`)."""
    writer = RecordWriter(out, fmt, name, embed_images=embed_images)
    # Worker processes, with units of one batch each: every worker decodes a batch while the model
    # captions another.
    loop = captioner.loop(
        request, batch_size=batch_size, workers=num_workers, processes=True, progress=progress, on_failure=on_failure
    )
    failures = 0
    for path, captions in loop.stream(map(as_source, sources)):
        if isinstance(captions, ImageLoadError):
            failures += 1
        else:
            writer.write(path, captions)
    writer.close()
    return failures
