"""Captioner: images in, captions out, with batching and image decoding (`loader`) overlapped with compute."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from prefixcap.data.hf import dataset_images
from prefixcap.engine.backends import choose_backend
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS, ImageSource
from prefixcap.inputs.loader import ImageLoader
from prefixcap.model.caption_model import CaptionModel
from prefixcap.model.fingerprint import model_fingerprint
from prefixcap.model.registry import resolve_model_dir
from prefixcap.onnx.runtime import OnnxCaptionModel, is_onnx_export
from prefixcap.options import CaptionRequest
from prefixcap.pipeline import loop as caption_loop
from prefixcap.retrieval.inference import Retrieval
from prefixcap.retrieval.store import Datastore
from prefixcap.system.hardware import QUANTIZE_CHOICES, auto_dtype, parse_device, quantize_int8


class Captioner:
    """Caption images with a `CaptionModel`.

    >>> captioner = Captioner.from_pretrained("clipcap-coco")
    >>> captioner(["photo.jpg"], num_beams=5)
    [['A man riding a wave on top of a surfboard.']]
    >>> captioner(["photo.jpg"], prompt="a photo of", prefix="sks person, ")  # see TextOptions
    >>> captioner(["photo.jpg"], num_return_sequences=5, rerank=CLIPScorer.from_pretrained(...))

    Every captioning method takes `rerank=` (a `Reranker`): each image's captions then come back
    best first by its scores, as `RankedCaptions` (which carry the scores).

    A model trained with retrieval (`prefixcap train --datastore`) captions with a caption
    datastore, any one built with its CLIP: `Captioner.from_pretrained(..., datastore="ds/")`, or
    per call `captioner(images, datastore=store, retrieve_k=4, show_retrieved=True)`, where each
    image's captions come back as `RetrievedCaptions` carrying what it retrieved.
    """

    def __init__(
        self,
        model: CaptionModel | OnnxCaptionModel,
        *,
        batch_size: int = 32,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        model_fingerprint: str | None = None,
        datastore: str | Path | Datastore | None = None,
        retrieve_k: int | None = None,
        show_retrieved: bool = False,
    ):
        self.model = model.eval()
        self.batch_size = batch_size
        self.loader = ImageLoader(model.preprocessor, max_pixels=max_pixels, jpeg_draft=jpeg_draft)
        # what the model was loaded from (`model_fingerprint`); None for a model built in memory
        self.model_fingerprint = model_fingerprint
        # every request's retrieval, unless a call names its own datastore (`request`)
        self.retrieval = self.retrieval_of(datastore, retrieve_k=retrieve_k, show_retrieved=show_retrieved)

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
        device = parse_device(device)
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

    def request(
        self,
        request: CaptionRequest | None = None,
        *,
        datastore: str | Path | Datastore | None = None,
        retrieve_k: int | None = None,
        show_retrieved: bool | None = None,
        **kwargs: Any,
    ) -> CaptionRequest:
        """The request the keyword arguments describe (decoding options by their `generate` names,
        the caption text options and `rerank`), checked once against the model; or `request` as
        given. With this captioner's datastore, or the `datastore` named here, the request
        retrieves (`retrieve_k` captions per image; `show_retrieved` returns them too)."""
        if request is not None:
            extra = [
                *kwargs,
                *(
                    name
                    for name, value in (
                        ("datastore", datastore),
                        ("retrieve_k", retrieve_k),
                        ("show_retrieved", show_retrieved),
                    )
                    if value is not None
                ),
            ]
            if extra:
                raise TypeError(f"pass either a request or options, not both (got {', '.join(sorted(extra))})")
            return request
        request = self.model.request(**kwargs)
        retrieval = self.retrieval_of(datastore, retrieve_k=retrieve_k, show_retrieved=show_retrieved)
        if retrieval is None:
            return request
        retrieval.check(self.model, request)
        return dataclasses.replace(request, retrieval=retrieval)

    def retrieval_of(
        self,
        datastore: str | Path | Datastore | None = None,
        *,
        retrieve_k: int | None = None,
        show_retrieved: bool | None = None,
    ) -> Retrieval | None:
        """The retrieval from `datastore` (else this captioner's own, if any), with `retrieve_k`
        and `show_retrieved` where given; None without a datastore."""
        if datastore is not None:
            return Retrieval.for_model(self.model, datastore, k=retrieve_k, show=bool(show_retrieved))
        own = getattr(self, "retrieval", None)
        if own is None:
            if retrieve_k is not None or show_retrieved:
                raise UserError("retrieve_k and show_retrieved need a datastore")
            return None
        return own.with_options(k=retrieve_k, show=show_retrieved)

    def caption_pixels(self, pixels: torch.Tensor, **kwargs: Any) -> list[list[str]]:
        """Captions for a batch of `preprocess` (uint8) pixels, grouped per image. Besides the
        decoding options, `kwargs` may hold the `TextOptions` (prompt, keep_prompt, prefix,
        suffix), as every captioning method of this class takes them, and `rerank`; or a checked
        `request` (`Captioner.request`)."""
        return caption_loop.caption_batch(self.model, self.request(**kwargs), pixels=pixels)

    def caption_embeds(self, image_embeds: torch.Tensor, **kwargs: Any) -> list[list[str]]:
        """Captions for a batch of image embeddings (a feature store's), as `caption_pixels`."""
        request = self.request(**kwargs)
        if request.rerank is not None:
            raise UserError("reranking scores the images themselves; stored image embeddings cannot be reranked")
        return caption_loop.caption_batch(self.model, request, image_embeds=image_embeds)

    def __call__(self, images: ImageSource | Sequence[ImageSource], **kwargs: Any) -> list[list[str]]:
        """Captions per image. Raises ImageLoadError on the first image that cannot be read.
        `images` may also be a `datasets.Dataset` or its image column, read one image at a time."""
        if not isinstance(images, (list, tuple)):
            images = dataset_images(images) or [images]
        results = []
        for _, captions in self.stream(images, **kwargs):
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
        **kwargs: Any,
    ) -> Iterator[tuple[Any, list[str] | ImageLoadError]]:
        """Yield (source, captions) in input order, for arbitrarily long inputs. Unreadable images
        yield their ImageLoadError instead of stopping the stream. Worker threads (or, with
        `processes`, DataLoader worker processes) decode the next batches while the model captions
        the current one. A shard typed as `LocalPath`/`RemoteShard` yields ("shard#member", ...)
        for each of its images."""
        loop = self.loop(self.request(**kwargs), batch_size=batch_size, workers=workers, processes=processes,
                         progress=progress)  # fmt: skip
        yield from loop.stream(sources)

    def caption_units(
        self,
        units: Iterable[Sequence[ImageSource]],
        *,
        batch_size: int | None = None,
        workers: int = 4,
        processes: bool = True,
        progress: Any = None,
        **kwargs: Any,
    ) -> Iterator[tuple[int, list[tuple[Any, list[str] | ImageLoadError]]]]:
        """Caption `units` (see `ImageLoader.batches`), yielding each (unit index, its (source,
        captions or failure) in input order) once complete; with processes, units complete in about
        (not exactly) their order. `progress` is a tqdm bar or anything else with `update(n)`."""
        loop = self.loop(self.request(**kwargs), batch_size=batch_size, workers=workers, processes=processes,
                         progress=progress)  # fmt: skip
        yield from loop.run(units)

    def loop(
        self, request: CaptionRequest, *, batch_size: int | None = None, **settings: Any
    ) -> caption_loop.CaptionLoop:
        """The caption loop over this captioner's model and loader for `request` (see `CaptionLoop`
        for the `settings`: workers, processes, progress, on_failure)."""
        return caption_loop.CaptionLoop(
            self.model, self.loader, request, batch_size=batch_size or self.batch_size, **settings
        )
