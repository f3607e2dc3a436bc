"""Captioner: images in, captions out, with batching and image decoding overlapped with compute."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from prefixcap.errors import ImageLoadError
from prefixcap.images import DEFAULT_MAX_PIXELS, ImageSource
from prefixcap.modeling import CaptionModel
from prefixcap.registry import resolve_model_dir


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Captioner:
    """Caption images with a `CaptionModel`.

    >>> captioner = Captioner.from_pretrained("clipcap-coco")
    >>> captioner(["photo.jpg"], num_beams=5)
    [['A man riding a wave on top of a surfboard.']]
    """

    def __init__(
        self,
        model: CaptionModel,
        *,
        batch_size: int = 32,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        model_fingerprint: str | None = None,
    ):
        self.model = model.eval()
        self.batch_size = batch_size
        self.max_pixels = max_pixels  # larger images are refused before decoding
        self.jpeg_draft = jpeg_draft  # decode JPEGs at reduced scale (faster; pixels differ slightly)
        # what the model was loaded from (`model_fingerprint`); None for a model built in memory
        self.model_fingerprint = model_fingerprint

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> Captioner:
        """Load a model; by default on CUDA in bf16 when available, else on CPU in fp32."""
        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        directory = resolve_model_dir(name_or_dir)
        # Taken before loading: files replaced meanwhile (training goes on) then change the
        # fingerprint of the next run, which redoes results, rather than hide behind this one.
        fingerprint = model_fingerprint(directory)
        model = CaptionModel.from_pretrained(directory, device=device, dtype=dtype)
        return cls(model, model_fingerprint=fingerprint, **kwargs)

    def preprocess(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """Decode, resize and crop one image to [3, H, W] uint8 pixels (normalised later, on the
        model's device); runs in worker threads (PIL releases the GIL)."""
        return self.model.preprocessor.load_pixels(
            source, name=name, max_pixels=self.max_pixels, jpeg_draft=self.jpeg_draft
        )

    @torch.no_grad()
    def caption_pixels(self, pixel_values: torch.Tensor, **generation_kwargs: Any) -> list[list[str]]:
        """Captions for a batch of `preprocess` (uint8) or image-processor (float) pixels,
        grouped per image."""
        ids = self.model.generate(pixel_values, **generation_kwargs)
        texts = self.model.decode(ids)
        per_image = len(texts) // pixel_values.shape[0]
        return [texts[i : i + per_image] for i in range(0, len(texts), per_image)]

    def __call__(self, images: ImageSource | Sequence[ImageSource], **generation_kwargs: Any) -> list[list[str]]:
        """Captions per image. Raises ImageLoadError on the first image that cannot be read."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        results = []
        for _, captions in self.stream(images, **generation_kwargs):
            if isinstance(captions, ImageLoadError):
                raise captions
            results.append(captions)
        return results

    def stream(
        self,
        sources: Iterable[ImageSource],
        *,
        batch_size: int | None = None,
        num_workers: int = 4,
        **generation_kwargs: Any,
    ) -> Iterator[tuple[ImageSource, list[str] | ImageLoadError]]:
        """Yield (source, captions) in input order, for arbitrarily long inputs. Unreadable images
        yield their ImageLoadError instead of stopping the stream. Worker threads decode the next
        batches while the model captions the current one."""
        batch_size = batch_size or self.batch_size
        window = batch_size * 2  # images decoding ahead of the model: two batches
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            pending: deque[tuple[ImageSource, Future]] = deque()
            batch: list[tuple[ImageSource, torch.Tensor | ImageLoadError]] = []
            for source in sources:
                pending.append((source, pool.submit(self._safe_preprocess, source)))
                if len(pending) >= window:
                    batch.append(_resolve(pending.popleft()))
                    if len(batch) == batch_size:
                        yield from self._caption_batch(batch, generation_kwargs)
                        batch = []
            while pending:
                batch.append(_resolve(pending.popleft()))
                if len(batch) == batch_size or not pending:
                    yield from self._caption_batch(batch, generation_kwargs)
                    batch = []

    def _safe_preprocess(self, source: ImageSource) -> torch.Tensor | ImageLoadError:
        try:
            return self.preprocess(source)
        except ImageLoadError as error:
            return error

    def _caption_batch(
        self, batch: list[tuple[ImageSource, torch.Tensor | ImageLoadError]], generation_kwargs: dict[str, Any]
    ) -> Iterator[tuple[ImageSource, list[str] | ImageLoadError]]:
        good = [pixels for _, pixels in batch if isinstance(pixels, torch.Tensor)]
        captions = iter(self.caption_pixels(torch.stack(good), **generation_kwargs) if good else [])
        for source, pixels in batch:
            yield source, pixels if isinstance(pixels, ImageLoadError) else next(captions)


def model_fingerprint(directory: str | Path) -> str:
    """A digest of the names, sizes and modification times of every file in a model directory.
    It changes when a model is saved again at the same path (a checkpoint of ongoing training), so
    that results made with the old model are not reused, and it reads no weights."""
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(directory):
        subfolders.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                status = os.stat(path)  # through links: hub snapshots link to their blobs
            except OSError:
                continue  # a broken link: loading the model reports it
            entry = f"{os.path.relpath(path, directory)}\0{status.st_size}\0{status.st_mtime_ns}\0"
            digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _resolve(item: tuple[ImageSource, Future]) -> tuple[ImageSource, Any]:
    source, future = item
    return source, future.result()
