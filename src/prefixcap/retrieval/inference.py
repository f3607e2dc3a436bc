"""Retrieval at captioning time: each image's prompt is the captions of its nearest neighbours in
a datastore, in the template the model was trained with (SmallCap, CVPR 2023).

A `Retrieval` is part of a `CaptionRequest` (`request.retrieval`), so that every way of captioning
(the Python API, `caption`, sidecar files, `evaluate`, the server) runs it in the one caption loop
(`prefixcap.pipeline.loop.caption_batch`): the images are encoded once, their embeddings search
the store, and the model captions the same embeddings after each image's own prompt. Any datastore
built with the model's CLIP serves, not only the one the model was trained with: swapping it
adapts the captions to another domain or house style without training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefixcap.errors import UserError
from prefixcap.model.caption_model import embed_pixels
from prefixcap.model.config import MAX_RETRIEVE_K
from prefixcap.options import CaptionRequest
from prefixcap.retrieval.prompt import retrieval_prompt
from prefixcap.retrieval.store import Datastore, Retrieved


@dataclass(frozen=True)
class Retrieval:
    """What a request retrieves: the `k` captions nearest each image in `store`, put in `template`
    within `prompt_tokens` decoder tokens (the model's settings, `CaptionConfig.retrieval_*`).
    `show`: each image's captions come back with what was retrieved for it (`retrieved`).

    Requests that share a Retrieval (the same store object and settings) compare equal, so a
    server batches them together."""

    store: Datastore
    k: int
    template: str
    prompt_tokens: int
    show: bool = False

    @classmethod
    def for_model(
        cls, model: Any, datastore: str | Path | Datastore, *, k: int | None = None, show: bool = False
    ) -> Retrieval:
        """The retrieval of `model` (a retrieval-trained `CaptionModel`) from `datastore` (a folder
        or a loaded store), `k` captions per image (default: as many as the model was trained with).
        Refused in one line: a model trained without retrieval, an ONNX export, a store whose
        captions were embedded with another CLIP than the model's image encoder."""
        config = model.config
        if not config.uses_retrieval:
            raise UserError(
                "this model was trained without retrieval, so retrieved captions in its prompt would mean nothing "
                "to it; train one with `prefixcap train FEATURES --datastore DS`"
            )
        if not hasattr(model, "vision_encoder"):
            raise UserError("retrieval needs the PyTorch model (its CLIP embeds the images); an ONNX export has none")
        _check_k(k)
        store = datastore if isinstance(datastore, Datastore) else Datastore.load(datastore)
        store.check_model(model)
        return cls(store, k or config.retrieval_k, config.retrieval_template, config.retrieval_prompt_tokens, show)

    def with_options(self, *, k: int | None = None, show: bool | None = None) -> Retrieval:
        """This retrieval with another `k` or `show`, where given."""
        _check_k(k)
        return dataclasses.replace(self, k=k or self.k, show=self.show if show is None else show)

    def check(self, model: Any, request: CaptionRequest) -> None:
        """ValueError, before any work, for a request that retrieval cannot serve: one with its own
        prompt, or one whose captions leave the template no room in the decoder's positions."""
        if request.text.prompt is not None:
            raise ValueError("with a datastore each image's prompt is made of the captions it retrieves: drop prompt")
        budget = self.budget(model, request)
        retrieval_prompt([], model.tokenizer, budget, self.template)  # the template alone must fit

    def budget(self, model: Any, request: CaptionRequest) -> int:
        """Decoder tokens the prompt may take: the model's setting, less what `max_new_tokens`
        needs of the positions after the prefix."""
        limit = model.max_new_tokens_limit
        if limit is None:
            return self.prompt_tokens
        room = limit - request.generation.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={request.generation.max_new_tokens} leaves no room for the retrieval prompt: the "
                f"decoder has {limit} positions after the prefix"
            )
        return min(self.prompt_tokens, room)

    def prepare(
        self,
        model: Any,
        request: CaptionRequest,
        *,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[str], list[Retrieved]]:
        """(the image embeddings the model captions from, each image's prompt, what each image
        retrieved), for uint8 `pixels` or stored `image_embeds`. The images are encoded once: the
        pooled CLIP embedding is both the mapper's input and the query (a resampler's patch
        tokens need a second, pooled pass)."""
        if (pixels is None) == (image_embeds is None):
            raise ValueError("pass exactly one of pixels or image_embeds")
        embeds = model.encode_pixels(pixels) if pixels is not None else model.check_image_embeds(image_embeds)
        if not model.config.uses_patches:
            queries = embeds
        elif pixels is not None:
            queries = embed_pixels(model.vision_encoder, model.preprocessor, pixels)
        else:
            raise UserError("retrieval searches with pooled image embeddings; stored patch tokens cannot search")
        found = self.store.search(queries, self.k)
        return embeds, self.prompts(found, model.tokenizer, self.budget(model, request)), found

    def prompts(self, found: Sequence[Retrieved], tokenizer: Any, budget: int) -> list[str]:
        """Each image's prompt from what it retrieved, best first, within `budget` tokens."""
        return [retrieval_prompt(result.captions, tokenizer, budget, self.template) for result in found]

    def settings(self) -> dict[str, Any]:
        """What captions made with this retrieval depend on (a folder job's parts are named by it)."""
        return {"datastore": self.store.fingerprint or str(self.store.path), "k": self.k, "template": self.template,
                "prompt_tokens": self.prompt_tokens, "show": self.show}  # fmt: skip


def _check_k(k: Any) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RETRIEVE_K):
        raise UserError(f"retrieve_k must be an integer in [1, {MAX_RETRIEVE_K}], got {k!r}")


def retrieved_json(found: Retrieved) -> list[dict[str, Any]]:
    """What an output record says an image retrieved: each caption with its cosine score, best first."""
    return [{"caption": caption, "score": round(score, 6)} for caption, score in zip(found.captions, found.scores)]
