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
images (what `prefixcap.jobs.ray_units.decode_units` writes), the actor only captions, and CPU-only
nodes decode.

`RayCaptioner.loop` is `Captioner.loop` on a cluster (the caption loop's `run` and `stream`):
units (a job's parts) go through a CPU decoding stage and a captioning stage (an actor pool of
`PrefixCaptioner`s, `num_gpus` each, each batch through the loop's step, `caption_batch`), and
come back to this process, which hands over each unit once all its images are back
(`prefixcap.jobs.ray_units`: also how a killed actor's work is retried without losing or
repeating an image). The jobs (`prefixcap.jobs.ray_job`) write each unit's
file atomically under a name keyed by the unit's inputs and settings, so a retried or rerun
unit replaces the same file with the same content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS
from prefixcap.inputs.loader import ImageLoader
from prefixcap.jobs.ray_units import RayCluster, failed_rows, on_torch_thread
from prefixcap.options import CaptionRequest
from prefixcap.pipeline import loop as caption_loop
from prefixcap.pipeline.loop import Outcome


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

        self.captioner = on_torch_thread(
            Captioner.from_pretrained, model, device=device, dtype=dtype, quantize=quantize, max_pixels=max_pixels,
            jpeg_draft=jpeg_draft,
        )  # fmt: skip
        try:  # bad options fail here, once per actor, not on every batch
            self.request = self.captioner.request(**options)
        except ValueError as error:
            raise UserError(str(error)) from None
        self.column = column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return on_torch_thread(self._captioned, batch)

    def _captioned(self, batch: dict[str, Any]) -> dict[str, Any]:
        errors = failed_rows(batch)
        rows = len(errors)
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


@dataclass
class RayCaptioner(RayCluster):
    """A `Captioner` on a Ray cluster, for prefixcap's jobs: `request` and `loop` as the
    Captioner's, the loop run by Ray Data (see the module's docstring). The cluster and its
    captioning actors are `RayCluster`'s (`address`, `actors`, `gpus_per_actor`, ...): nothing
    connects until there is work, so a rerun of a finished job starts no cluster and loads no
    model. Use it as a context manager, which disconnects (and stops a local cluster) at the end."""

    model: str
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

    def __post_init__(self) -> None:
        super().__post_init__()
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
        images are back, units in the order they complete (`RayCluster.map_units`)."""
        if prompts is not None:
            raise UserError("per-image prompts do not run on Ray yet")
        captioner = self.captioner
        yield from captioner.map_units(
            units, loader=captioner.loader, batch_size=self.batch_size, actor=PrefixCaptioner,
            actor_kwargs={
                "model": str(captioner.model_dir), "device": captioner.device, "dtype": captioner.dtype,
                "quantize": captioner.quantize, "request": self.request,
            },
            result="captions", progress=self.progress, on_failure=self.on_failure,
        )  # fmt: skip


def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-d object array of `values` (lists stay whole cells, as np.array would not keep them)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
