"""Captioner: images in, captions out, with batching and image decoding (`loader`) overlapped with compute."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from prefixcap.data.hf import dataset_images
from prefixcap.engine.backends import choose_backend
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS, ImageSource
from prefixcap.inputs.loader import ImageLoader, group, in_order
from prefixcap.model.caption_model import CaptionModel
from prefixcap.model.fingerprint import model_fingerprint
from prefixcap.model.registry import resolve_model_dir
from prefixcap.onnx.runtime import OnnxCaptionModel, is_onnx_export
from prefixcap.options import TextOptions
from prefixcap.system.hardware import QUANTIZE_CHOICES, auto_dtype, default_device, quantize_int8


class Reranker(Protocol):
    """Scores candidate captions (higher is better), e.g. `prefixcap.evaluation.clipscore.CLIPScorer`.
    The captioner only needs this much, so that the scorer, a layer above, is built by the caller."""

    def __call__(self, pixels: torch.Tensor, captions: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per caption of each image of the batch; `pixels` are `Captioner.preprocess`'s uint8."""
        ...


class RankedCaptions(list[str]):
    """An image's captions sorted best first by a `Reranker`, with their `scores` in the same order.
    A plain list of captions everywhere else, so reranking changes no caller's types; outputs
    (`jobs.writers`) write the scores when they are there."""

    def __init__(self, captions: Iterable[str], scores: Iterable[float]):
        super().__init__(captions)
        self.scores = list(scores)

    @classmethod
    def ranked(cls, captions: Sequence[str], scores: Sequence[float]) -> RankedCaptions:
        """`captions` sorted by descending score; ties keep the decoder's order (`sorted` is stable)."""
        if len(captions) != len(scores):
            raise ValueError(f"the reranker gave {len(scores)} score(s) for {len(captions)} caption(s)")
        order = sorted(range(len(captions)), key=lambda index: -scores[index])
        return cls((captions[index] for index in order), (float(scores[index]) for index in order))


class Captioner:
    """Caption images with a `CaptionModel`.

    >>> captioner = Captioner.from_pretrained("clipcap-coco")
    >>> captioner(["photo.jpg"], num_beams=5)
    [['A man riding a wave on top of a surfboard.']]
    >>> captioner(["photo.jpg"], prompt="a photo of", prefix="sks person, ")  # see TextOptions
    >>> captioner(["photo.jpg"], num_return_sequences=5, rerank=CLIPScorer.from_pretrained(...))

    Every captioning method takes `rerank=` (a `Reranker`): each image's captions then come back
    best first by its scores, as `RankedCaptions` (which carry the scores).
    """

    def __init__(
        self,
        model: CaptionModel | OnnxCaptionModel,
        *,
        batch_size: int = 32,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        model_fingerprint: str | None = None,
    ):
        self.model = model.eval()
        self.batch_size = batch_size
        self.loader = ImageLoader(model.preprocessor, max_pixels=max_pixels, jpeg_draft=jpeg_draft)
        # what the model was loaded from (`model_fingerprint`); None for a model built in memory
        self.model_fingerprint = model_fingerprint

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = "auto",
        quantize: str | None = None,
        **kwargs: Any,
    ) -> Captioner:
        """Load a model; by default on CUDA when available, else on CPU. `dtype="auto"` (or None)
        picks bf16 on CUDA and on CPUs with bf16 matrix instructions, else fp32
        (`prefixcap.system.hardware.auto_dtype`); `precision` says which and why. `quantize="int8"` makes
        the decoder's linear layers dynamic int8 (CPU only; `hardware.quantize_int8`). A folder
        written by `prefixcap export onnx` runs on ONNX Runtime, on CPU (`onnx.runtime`)."""
        if is_onnx_export(name_or_dir):  # device, dtype and quantization were fixed at export
            fingerprint = model_fingerprint(name_or_dir)
            onnx_model = OnnxCaptionModel.from_pretrained(name_or_dir, device=device, dtype=dtype, quantize=quantize)
            captioner = cls(onnx_model, model_fingerprint=fingerprint, **kwargs)
            captioner.precision, captioner.quantize = onnx_model.precision, onnx_model.quantize
            return captioner
        device = torch.device(device) if device is not None else default_device()
        if quantize is not None and quantize not in QUANTIZE_CHOICES:
            raise UserError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
        if quantize is not None and device.type != "cpu":
            raise UserError(f"--quantize {quantize} runs on CPU only (PyTorch has no {device.type} kernels for it)")
        if dtype is None or dtype == "auto":
            dtype, why = auto_dtype(device, quantize=quantize)
        else:
            dtype, why = (getattr(torch, dtype) if isinstance(dtype, str) else dtype), "as asked"
            if quantize is not None and dtype != torch.float32:
                raise UserError(f"--quantize {quantize} needs --dtype float32 (its kernels take float32 activations)")
        directory = resolve_model_dir(name_or_dir)
        # Taken before loading: files replaced meanwhile (training goes on) then change the
        # fingerprint of the next run, which redoes results, rather than hide behind this one.
        fingerprint = model_fingerprint(directory)
        model = CaptionModel.from_pretrained(directory, device=device, dtype=dtype)
        if quantize is not None:
            quantize_int8(model.decoder)
        captioner = cls(model, model_fingerprint=fingerprint, **kwargs)
        captioner.precision = f"{str(dtype).removeprefix('torch.')} ({why})"
        captioner.quantize = quantize
        return captioner

    # How `from_pretrained` chose the dtype, e.g. "float32 (this CPU has no AMX or AVX512-BF16)",
    # and the weight quantization it applied; None for a model built in memory.
    precision: str | None = None
    quantize: str | None = None

    @property
    def decoding_path(self) -> str:
        """Which decoder runs, e.g. "prefixcap engine (llama)", "HF generate (PhiForCausalLM: not
        supported by the engine)" or "ONNX Runtime"."""
        return choose_backend(self.model.decoder).description

    def preprocess(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """Decode, resize and crop one image to [3, H, W] uint8 pixels (normalised later, on the
        model's device); raises ImageLoadError (`ImageLoader.load`)."""
        return self.loader.load(source, name)

    def caption_pixels(self, pixels: torch.Tensor, **generation_kwargs: Any) -> list[list[str]]:
        """Captions for a batch of `preprocess` (uint8) pixels, grouped per image. Besides the
        decoding options, `generation_kwargs` may hold the `TextOptions` (prompt, keep_prompt,
        prefix, suffix), as every captioning method of this class takes them, and `rerank`."""
        rerank: Reranker | None = generation_kwargs.pop("rerank", None)
        captions = self._caption(generation_kwargs, pixels=pixels)
        if rerank is None:
            return captions
        scores = rerank(pixels, captions)
        return [RankedCaptions.ranked(texts, scored) for texts, scored in zip(captions, scores, strict=True)]

    def caption_embeds(self, image_embeds: torch.Tensor, **generation_kwargs: Any) -> list[list[str]]:
        """Captions for a batch of image embeddings (a feature store's), as `caption_pixels`."""
        if generation_kwargs.pop("rerank", None) is not None:
            raise UserError("reranking scores the images themselves; stored image embeddings cannot be reranked")
        return self._caption(generation_kwargs, image_embeds=image_embeds)

    def _caption(self, kwargs: dict[str, Any], **inputs: torch.Tensor) -> list[list[str]]:
        """The model's captions, between the prefix and suffix: text formatting after decoding.
        The reranker scores the captions as written, prefix and suffix included."""
        text, generation = TextOptions.split(kwargs)
        captions = self.model.caption(**inputs, prompt=text.prompt, keep_prompt=text.keep_prompt, **generation)
        return [[text.wrap(caption) for caption in per_image] for per_image in captions]

    def __call__(self, images: ImageSource | Sequence[ImageSource], **generation_kwargs: Any) -> list[list[str]]:
        """Captions per image. Raises ImageLoadError on the first image that cannot be read.
        `images` may also be a `datasets.Dataset` or its image column, read one image at a time."""
        if not isinstance(images, (list, tuple)):
            images = dataset_images(images) or [images]
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
        workers: int = 4,
        processes: bool = False,
        progress: Any = None,
        **generation_kwargs: Any,
    ) -> Iterator[tuple[Any, list[str] | ImageLoadError]]:
        """Yield (source, captions) in input order, for arbitrarily long inputs. Unreadable images
        yield their ImageLoadError instead of stopping the stream. Worker threads (or, with
        `processes`, DataLoader worker processes) decode the next batches while the model captions
        the current one. A shard typed as `LocalPath`/`RemoteShard` yields ("shard#member", ...)
        for each of its images."""
        batch_size = batch_size or self.batch_size
        units = group(sources, batch_size)
        yield from in_order(
            self.caption_units(
                units, batch_size=batch_size, workers=workers, processes=processes, progress=progress,
                **generation_kwargs,
            )
        )  # fmt: skip

    def caption_units(
        self,
        units: Iterable[Sequence[ImageSource]],
        *,
        batch_size: int | None = None,
        workers: int = 4,
        processes: bool = True,
        progress: Any = None,
        **generation_kwargs: Any,
    ) -> Iterator[tuple[int, list[tuple[Any, list[str] | ImageLoadError]]]]:
        """Caption `units` (see `ImageLoader.batches`), yielding each (unit index, its (source,
        captions or failure) in input order) once complete; with processes, units complete in about
        (not exactly) their order. `progress` is a tqdm bar or anything else with `update(n)`."""
        batches = self.loader.batches(
            units, batch_size=batch_size or self.batch_size, workers=workers, processes=processes,
            pin_memory=processes and self.model.device.type == "cuda",
        )  # fmt: skip
        pending: dict[int, list[tuple[Any, list[str] | ImageLoadError]]] = {}  # unit -> its results so far
        for batch in batches:
            # 1. Caption the readable images; the failed ones keep their place with their error.
            captions = iter(self.caption_pixels(batch.pixels, **generation_kwargs) if batch.pixels is not None else [])
            results = pending.setdefault(batch.unit, [])
            for position, key in enumerate(batch.keys):
                results.append((key, batch.failures[position] if position in batch.failures else next(captions)))
            if progress is not None:
                progress.update(len(batch.keys))
            # 2. Hand over the unit once its last batch is done.
            if batch.last:
                yield batch.unit, pending.pop(batch.unit)
