"""Captioning on a Ray cluster with Ray Data: an actor class for your own pipelines, and a
`Captioner`-shaped front (`RayCaptioner`) that runs prefixcap's jobs on a cluster.

In your own Ray pipeline, `PrefixCaptioner` loads one model per actor, once, and adds captions
to each batch:

    import ray
    from prefixcap.jobs.ray import PrefixCaptioner

    ds = ray.data.read_parquet("s3://bucket/images/")          # an `image` column: bytes or {bytes, path}
    ds = ds.map_batches(
        PrefixCaptioner, fn_constructor_kwargs={"model": "clipcap-coco", "num_beams": 3},
        compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1, batch_size=256,
    )
    ds.write_parquet("s3://bucket/captions/")                  # + columns caption, captions, error

A bad image becomes a row with `error` set (caption null), never a failed job. Decoding in the
actor ties the CPU work to the GPU's node; with a `pixels` column of decoded uint8 [3, H, W]
images (what `decode_units` writes), the actor only captions, and CPU-only nodes decode.

`RayCaptioner.loop` is `Captioner.loop` on a cluster (the caption loop's `run` and `stream`):
units (a job's parts) go through a CPU decoding stage (tasks, `decode_units`, with prefixcap's
`ImageLoader`) and a captioning stage (an actor pool of `PrefixCaptioner`s, `num_gpus` each, each
batch through the loop's step, `caption_batch`), and come back to this process, which hands over
each unit once all its images are back. Ray retries the work of a
killed actor or a lost node; the unit's images are keyed by their position, so a unit is handed
over exactly once whatever Ray ran twice. The jobs (`prefixcap.jobs.ray_job`) write each unit's
file atomically under a name keyed by the unit's inputs and settings, so a retried or rerun
unit replaces the same file with the same content.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS
from prefixcap.inputs.loader import ImageLoader, chunked
from prefixcap.inputs.sources import LocalPath, RemoteShard, StoredImage
from prefixcap.jobs.ray_inputs import StoreObject, read_store_object
from prefixcap.options import CaptionRequest
from prefixcap.pipeline import loop as caption_loop
from prefixcap.pipeline.loop import Outcome
from prefixcap.system.extras import require

# Source kinds as they travel in a Ray Dataset (Arrow keeps strings, not their Python class):
# a name keeps the kind it was given (a file named like a URL stays a file).
_KINDS = {kind.__name__: kind for kind in (LocalPath, RemoteShard, StoredImage, StoreObject)}
LOCAL = "local"  # the address that starts a cluster on this machine for the job


class PrefixCaptioner:
    """A callable class for `Dataset.map_batches`: one `Captioner` per actor, loaded once.

    Each batch is a dict of columns. Images come from `pixels` (decoded uint8 [3, H, W] arrays)
    when the batch has it, else from `column` (encoded bytes, a `datasets` Image struct
    `{bytes, path}`, or a local file path). Rows whose `error` is already set (a failure of an
    earlier stage) are passed through. Returns the batch without `pixels`, plus `caption` (the
    best caption, null for a failure), `captions` (all of them, best first) and `error`.
    `options` are the decoding and text options (`num_beams=3`, `prompt=...`), or a checked
    `request` (a `CaptionRequest`), checked against the model once, when the actor starts."""

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = "auto",
        quantize: str | None = None,
        column: str = "image",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        **options: Any,
    ):
        from prefixcap.captioner import Captioner

        self.captioner = Captioner.from_pretrained(
            model, device=device, dtype=dtype, quantize=quantize, max_pixels=max_pixels, jpeg_draft=jpeg_draft
        )
        try:  # bad options fail here, once per actor, not on every batch
            self.request = self.captioner.request(**options)
        except ValueError as error:
            raise UserError(str(error)) from None
        self.column = column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = len(next(iter(batch.values())))
        errors = [_text(error) for error in batch["error"]] if "error" in batch else [None] * rows
        images = self._pixels(batch, errors)
        good = [row for row in range(rows) if errors[row] is None]
        captions: list[list[str] | None] = [None] * rows
        if good:
            for row, texts in zip(good, self._caption(torch.stack([images[row] for row in good])), strict=True):
                captions[row] = list(texts)
        out = {name: values for name, values in batch.items() if name != "pixels"}
        out["caption"] = np.array([texts[0] if texts else None for texts in captions], dtype=object)
        out["captions"] = _object_array(captions)
        out["error"] = np.array(errors, dtype=object)
        return out

    def _caption(self, pixels: torch.Tensor) -> list[list[str]]:
        """The one place that captions: a batch of uint8 pixels through the caption loop's step."""
        return caption_loop.caption_batch(self.captioner.model, self.request, pixels=pixels)

    def _pixels(self, batch: dict[str, Any], errors: list[str | None]) -> list[torch.Tensor | None]:
        """Each row's uint8 pixels (None for a failed row), decoding the `column` images here when
        the batch has no `pixels`; a row that cannot be decoded gets its reason in `errors`."""
        if "pixels" in batch:
            return [None if error is not None else torch.as_tensor(np.asarray(pixels))
                    for pixels, error in zip(batch["pixels"], errors)]  # fmt: skip
        if self.column not in batch:
            raise UserError(f"the batch has neither 'pixels' nor an image column {self.column!r} ({', '.join(batch)})")
        names = batch.get("path")
        images: list[torch.Tensor | None] = []
        for row, source in enumerate(batch[self.column]):
            outcome = None
            if errors[row] is None:
                name = str(names[row]) if names is not None else f"row {row}"
                outcome = self.captioner.loader.try_load(source, name)
                if isinstance(outcome, ImageLoadError):
                    errors[row], outcome = outcome.reason, None
            images.append(outcome)
        return images


def decode_units(batch: dict[str, Any], *, loader: ImageLoader, batch_size: int) -> Iterator[dict[str, Any]]:
    """The CPU stage: the images of each unit (a row: `unit`, `sources`, `kinds`) decoded by
    prefixcap's loader, in batches of at most `batch_size` rows with columns `unit`, `position`
    (in the unit), `count` (the unit's number of images, on the rows of its last batch; -1
    before), `key` (the source, or "shard#member"), `pixels` and `error` (why an image has no
    pixels). A unit without images (an empty shard) gives one row at position -1."""
    for unit, sources, kinds in zip(batch["unit"], batch["sources"], batch["kinds"]):
        typed = [_KINDS[kind](source) for source, kind in zip(sources, kinds)]
        chunks = chunked(_decoded(typed, loader, batch_size), batch_size)
        chunk, position = next(chunks, []), 0
        while chunk is not None:
            following = next(chunks, None)  # None: `chunk` is the unit's last
            keys = [key for key, _ in chunk]
            errors = [outcome.reason if isinstance(outcome, ImageLoadError) else None for _, outcome in chunk]
            blank = _blank([outcome for _, outcome in chunk], loader)
            pixels = [blank if isinstance(outcome, ImageLoadError) else outcome for _, outcome in chunk]
            positions = list(range(position, position + len(chunk)))
            if not chunk:  # the end of a unit without images
                keys, positions, pixels, errors = [""], [-1], [blank], ["no images"]
            position += len(chunk)
            count = position if following is None else -1
            yield {
                "unit": np.full(len(keys), unit), "position": np.array(positions), "count": np.full(len(keys), count),
                "key": np.array(keys, dtype=object), "pixels": np.stack([p.numpy() for p in pixels]),
                "error": np.array(errors, dtype=object),
            }  # fmt: skip
            chunk = following


def _decoded(
    sources: list[Any], loader: ImageLoader, batch_size: int
) -> Iterator[tuple[str, torch.Tensor | ImageLoadError]]:
    """(key, pixels or why there are none) for each image of a unit, in order: object-store
    objects read through pyarrow, everything else by the loader as in a local job."""
    for in_store, run in itertools.groupby(sources, key=lambda source: isinstance(source, StoreObject)):
        if in_store:
            for source in run:
                for key, data in read_store_object(source):
                    yield key, data if isinstance(data, ImageLoadError) else loader.try_load(data, key)
            continue
        for decoded in loader.batches([list(run)], batch_size=batch_size, workers=0):
            good = iter(decoded.pixels if decoded.pixels is not None else [])
            for position, key in enumerate(decoded.keys):
                yield str(key), decoded.failures[position] if position in decoded.failures else next(good)


@dataclass
class RayCaptioner:
    """A `Captioner` on a Ray cluster, for prefixcap's jobs: `request` and `loop` as the
    Captioner's, the loop run by Ray Data (see the module's docstring). `address`: an existing cluster
    (`auto`, `ray://HOST:PORT`, `HOST:PORT`), or `local` (the default) for a cluster of this
    machine started for the job on 127.0.0.1. Nothing connects until there is work: a rerun of
    a finished job starts no cluster and loads no model. Use it as a context manager, which
    disconnects (and stops a local cluster) at the end.

    `actors` captioning actors of `gpus_per_actor` GPUs, `cpus_per_actor` CPUs and custom
    `resources` each (`{"captioner": 1}` places them on the nodes started with that resource).
    Decoding takes one CPU per task wherever the cluster has CPUs free; when the actors ask for
    nothing else (captioning on CPUs), Ray runs it inside the actors instead, which spares
    moving pixels between processes."""

    model: str
    address: str = LOCAL
    actors: int = 1
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    resources: dict[str, float] | None = None
    device: str | None = None
    dtype: str | None = "auto"
    quantize: str | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = False
    batch_size: int = 32
    model_dir: Path = field(init=False)
    model_fingerprint: str = field(init=False)  # what the model's files were when the job started
    loader: ImageLoader = field(init=False)
    text: Any = field(init=False)  # the model's text side (`CaptionText`): requests are checked here
    _connected: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        require("ray", feature="Ray jobs (--ray)")
        from prefixcap.inputs.preprocess import ImagePreprocessor
        from prefixcap.model.caption_model import CaptionText
        from prefixcap.model.encoders import load_image_processor
        from prefixcap.model.fingerprint import model_fingerprint
        from prefixcap.model.registry import resolve_model_dir

        self.model_dir = resolve_model_dir(self.model).absolute()  # the path the actors load
        self.model_fingerprint = model_fingerprint(self.model_dir)
        self.text = CaptionText.from_pretrained(self.model_dir)
        processor = ImagePreprocessor(load_image_processor(self.model_dir / "image_processor"))
        self.loader = ImageLoader(processor, max_pixels=self.max_pixels, jpeg_draft=self.jpeg_draft)

    def __enter__(self) -> RayCaptioner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect from the cluster; a local cluster started for the job stops."""
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False

    def request(self, request: CaptionRequest | None = None, **kwargs: Any) -> CaptionRequest:
        """The request the keyword arguments describe, checked once against the model's text side
        (as `Captioner.request`); or `request` as given. The actors caption with it."""
        if request is not None:
            if kwargs:
                raise TypeError(f"pass either a request or options, not both (got {', '.join(sorted(kwargs))})")
            return request
        return self.text.request(**kwargs)

    def loop(
        self,
        request: CaptionRequest,
        *,
        batch_size: int | None = None,
        progress: Any = None,
        on_failure: Callable[[ImageLoadError], None] | None = None,
        **local_settings: Any,
    ) -> RayLoop:
        """The caption loop for `request` on the cluster (`workers` and `processes`, which a local
        loop takes, are the cluster's business)."""
        if request.rerank is not None:
            raise UserError("reranking does not run on Ray yet; caption without --ray")
        return RayLoop(self, request, batch_size or self.batch_size, progress, on_failure)

    def _connect(self) -> None:
        """Join the cluster at `address`, or start one on this machine (127.0.0.1 only)."""
        if self._connected:
            return
        import ray

        # The workers' logs stay in the cluster's log files (and dashboard); failures still come here.
        settings: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if self.address == LOCAL:
            settings |= {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False}
        else:
            settings["address"] = self.address
        try:
            ray.init(**settings)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise UserError(f"--ray {self.address}: cannot connect to the Ray cluster ({error})") from None
        self._connected = True
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # prefixcap shows its own progress line
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


@dataclass
class RayLoop:
    """The caption loop (`pipeline.loop.CaptionLoop`: `run`, `stream`) with its work on a cluster."""

    captioner: RayCaptioner
    request: CaptionRequest
    batch_size: int
    progress: Any = None
    on_failure: Callable[[ImageLoadError], None] | None = None

    def stream(
        self, sources: Iterable[Any], prompts: Sequence[str | None] | None = None
    ) -> Iterator[tuple[Any, Outcome]]:
        """(source, captions or failure) in input order, as `CaptionLoop.stream`."""
        if prompts is not None:
            raise UserError("per-image prompts do not run on Ray yet")
        yield from caption_loop.in_order(self.run(caption_loop.group(sources, self.batch_size)))

    def run(
        self, units: Iterable[Sequence[Any]], prompts: Sequence[Sequence[str | None]] | None = None
    ) -> Iterator[tuple[int, list[tuple[Any, Outcome]]]]:
        """Yield each (unit index, its (key, captions or failure) in input order) once all its
        images are back, units in the order they complete. `units` are lists of typed sources
        (`LocalPath`, `RemoteShard`, `StoredImage`, `StoreObject`)."""
        if prompts is not None:
            raise UserError("per-image prompts do not run on Ray yet")
        rows = [
            {"unit": index, "sources": [str(s) for s in unit], "kinds": [type(s).__name__ for s in unit]}
            for index, unit in enumerate(units)
        ]
        if not rows:
            return
        for name in {kind for row in rows for kind in row["kinds"]} - set(_KINDS):
            raise TypeError(f"a unit holds a {name}; Ray jobs take typed names ({', '.join(_KINDS)})")
        self.captioner._connect()
        import ray

        captioner, batch_size = self.captioner, self.batch_size
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        dataset = dataset.map_batches(
            decode_units, fn_kwargs={"loader": captioner.loader, "batch_size": batch_size}, batch_size=1, num_cpus=1
        )
        dataset = dataset.map_batches(
            PrefixCaptioner,
            fn_constructor_kwargs={
                "model": str(captioner.model_dir), "device": captioner.device, "dtype": captioner.dtype,
                "quantize": captioner.quantize, "request": self.request,
            },
            compute=ray.data.ActorPoolStrategy(size=captioner.actors),
            num_gpus=captioner.gpus_per_actor,
            num_cpus=captioner.cpus_per_actor,
            resources=captioner.resources,
            batch_size=batch_size,
        )  # fmt: skip
        columns = ["unit", "position", "count", "key", "captions", "error"]
        pending: dict[int, _Unit] = {}
        done: set[int] = set()  # units handed over: rows that Ray delivers again are ignored
        try:
            for table in dataset.select_columns(columns).iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in table.to_pylist():
                    if row["unit"] in done:
                        continue
                    unit = pending.setdefault(row["unit"], _Unit())
                    if unit.add(row) and self.progress is not None:
                        self.progress.update(1)
                    if unit.complete:
                        outcomes = pending.pop(row["unit"]).outcomes()
                        for _, outcome in outcomes:
                            if isinstance(outcome, ImageLoadError) and self.on_failure is not None:
                                self.on_failure(outcome)
                        yield row["unit"], outcomes
                        done.add(row["unit"])
        except ray.exceptions.RayError as error:
            raise _user_error(error) from None
        if len(done) != len(rows):  # Ray lost rows: never hand over a unit with holes
            missing = sorted(set(range(len(rows))) - done)
            raise RuntimeError(f"Ray returned no complete result for units {missing[:10]}")


class _Unit:
    """The results of one unit so far, by position; a result that Ray delivers twice counts once."""

    def __init__(self) -> None:
        self.count = -1
        self.results: dict[int, tuple[str, list[str] | None, str | None]] = {}

    def add(self, row: dict[str, Any]) -> bool:
        """Record one row; whether it was new."""
        if row["count"] >= 0:
            self.count = row["count"]
        if row["position"] < 0 or row["position"] in self.results:
            return False
        self.results[row["position"]] = (row["key"], row["captions"], _text(row["error"]))
        return True

    @property
    def complete(self) -> bool:
        return self.count >= 0 and len(self.results) == self.count

    def outcomes(self) -> list[tuple[str, list[str] | ImageLoadError]]:
        return [
            (key, ImageLoadError(key, error) if error is not None else list(captions))
            for key, captions, error in (self.results[position] for position in range(self.count))
        ]


def _blank(outcomes: list[torch.Tensor | ImageLoadError], loader: ImageLoader) -> torch.Tensor:
    """Zero pixels in the place of an image that has none, shaped like the batch's images."""
    for outcome in outcomes:
        if isinstance(outcome, torch.Tensor):
            return torch.zeros_like(outcome)
    height, width = loader.preprocessor.output_size or (1, 1)
    return torch.zeros((3, height, width), dtype=torch.uint8)


def _text(value: Any) -> str | None:
    """A cell of a string column, None where empty: Ray may hand a column of nulls over as NaN."""
    return value if isinstance(value, str) else None


def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-d object array of `values` (lists stay whole cells, as np.array would not keep them)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _user_error(error: Exception) -> Exception:
    """The UserError inside a Ray failure (bad options, an unloadable model), else the failure."""
    cause: BaseException | None = error
    for _ in range(8):  # Ray wraps a task's error in its own, at each stage it crosses
        if cause is None or isinstance(cause, UserError):
            break
        cause = getattr(cause, "cause", None) or cause.__cause__
    return cause if isinstance(cause, UserError) else error
