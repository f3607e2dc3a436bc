"""Captioner: images in, captions out, with batching and image decoding overlapped with compute."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from prefixcap.errors import ImageLoadError
from prefixcap.images import DEFAULT_MAX_PIXELS, ImageSource
from prefixcap.modeling import CaptionModel


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
    ):
        self.model = model.eval()
        self.batch_size = batch_size
        self.max_pixels = max_pixels  # larger images are refused before decoding
        self.jpeg_draft = jpeg_draft  # decode JPEGs at reduced scale (faster; pixels differ slightly)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> "Captioner":
        """Load a model; by default on CUDA in bf16 when available, else on CPU in fp32."""
        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return cls(CaptionModel.from_pretrained(name_or_dir, device=device, dtype=dtype), **kwargs)

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


def _resolve(item: tuple[ImageSource, Future]) -> tuple[ImageSource, Any]:
    source, future = item
    return source, future.result()
