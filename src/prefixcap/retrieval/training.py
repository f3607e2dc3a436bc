"""Retrieval for training (`prefixcap train --datastore DS`): each image's prompt is the captions
its stored CLIP embedding retrieves, as at captioning time, except that an image never retrieves
its own captions: a model that saw its answer in its prompt would learn to copy it, and copy the
wrong one from any other store.

An image's own captions are known by its id when the store holds it (a store built from the
training set, with the same `--images-root`), and otherwise by their text: every row with one of
its captions' exact text is left out. Nothing is judged by score, which would also drop the
captions of true look-alikes. Retrieval runs once per run, over the whole feature store, before
the first step: the prompts do not change between epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prefixcap.data import CaptionRecord
from prefixcap.errors import UserError
from prefixcap.model.config import CaptionConfig
from prefixcap.retrieval.prompt import DEFAULT_TEMPLATE, check_template, retrieval_prompt
from prefixcap.retrieval.store import Datastore, Retrieved

SEARCH_BATCH = 4096  # images per search call: one FAISS call per batch, its threads over the queries


@dataclass
class SelfExclusion:
    """How the images' own captions were recognised: by image id, or by caption text."""

    by_id: int = 0
    by_text: int = 0

    def __str__(self) -> str:
        text = f"{self.by_id} images' own captions left out by image id"
        if self.by_text:
            text += (
                f", {self.by_text} by caption text (the store does not hold these images' ids: built from another "
                "dataset, or with another --images-root)"
            )
        return text


@dataclass(frozen=True)
class TrainingRetrieval:
    """A training run's retrieval: `k` captions per image from `store`, in `template`, within
    `max_tokens` decoder tokens of `tokenizer`."""

    store: Datastore
    k: int
    template: str
    max_tokens: int
    tokenizer: Any

    @classmethod
    def open(cls, datastore: str, model: Any, *, k: int, template: str | None, prompt_tokens: int) -> TrainingRetrieval:
        """The retrieval for training `model` (a `CaptionModel`) with the store at `datastore`,
        refused in one line if its captions were embedded with another CLIP than the model's.
        Prompts take at most half the decoder's positions after the prefix: the captions need the rest."""
        store = Datastore.load(datastore)
        store.check_model(model)
        limit = model.max_new_tokens_limit
        max_tokens = prompt_tokens if limit is None else min(prompt_tokens, limit // 2)
        template = check_template(template or DEFAULT_TEMPLATE)
        retrieval_prompt([], model.tokenizer, max_tokens, template)  # the template alone must fit
        return cls(store, k, template, max_tokens, model.tokenizer)

    def records(
        self, records: Sequence[CaptionRecord], image_embeds: Any, max_tokens: int, say: Any = print
    ) -> list[CaptionRecord]:
        """`records` with their retrieval prompts (`retrieval_records`); `say` hears how their own
        captions were left out."""
        prompted, _, exclusion = retrieval_records(
            self.store, records, image_embeds, k=self.k, template=self.template, tokenizer=self.tokenizer,
            max_tokens=max_tokens, progress=True,
        )  # fmt: skip
        say(f"retrieval: {len(records)} images, {self.k} captions each from {self.store.path}; {exclusion}")
        return prompted

    def record(self, config: CaptionConfig) -> None:
        """Write into a model's config that it expects retrieval, and how its prompts are made."""
        config.prompt = None
        config.retrieval_k, config.retrieval_template, config.retrieval_prompt_tokens = (
            self.k, self.template, self.max_tokens
        )  # fmt: skip


def retrieval_records(
    store: Datastore,
    records: Sequence[CaptionRecord],
    image_embeds: Any,
    *,
    k: int,
    template: str,
    tokenizer: Any,
    max_tokens: int,
    progress: bool = False,
) -> tuple[list[CaptionRecord], list[Retrieved], SelfExclusion]:
    """`records` (whose pooled CLIP embeddings are the rows of `image_embeds`), each with its
    retrieval prompt: the `k` captions nearest its image in `store`, its own left out, in
    `template` within `max_tokens` decoder tokens of `tokenizer`; what each retrieved; how their
    own captions were recognised. Records with prompts of their own are refused: the retrieved
    captions are the prompt. So is a budget that leaves no room for a single caption."""
    own_prompt = next((record for record in records if record.prompt), None)
    if own_prompt is not None:
        raise UserError(
            f"image {own_prompt.image_id!r} has its own prompt {own_prompt.prompt!r}; with --datastore each "
            "image's prompt is the captions it retrieves, so train on a dataset without prompts"
        )
    if len(image_embeds.shape) != 2:
        raise UserError(
            "retrieval searches with pooled image embeddings; this feature store holds patch tokens (prepare "
            "another with --features pooled)"
        )
    exclusion = SelfExclusion()
    prompted, retrieved = [], []
    starts = range(0, len(records), SEARCH_BATCH)
    for start in tqdm(starts, desc="retrieving captions", unit="batch", disable=None if progress else True):
        batch = records[start : start + SEARCH_BATCH]
        known = [store.holds_image(record.image_id) for record in batch]
        exclusion.by_id += sum(known)
        exclusion.by_text += len(batch) - sum(known)
        found = store.search(
            torch.as_tensor(image_embeds[start : start + len(batch)]).float(),
            k,
            exclude=[record.image_id if held else None for record, held in zip(batch, known)],
            exclude_captions=[() if held else record.captions for record, held in zip(batch, known)],
        )
        for record, result in zip(batch, found):
            prompt = retrieval_prompt(result.captions, tokenizer, max_tokens, template)
            prompted.append(dataclasses.replace(record, prompt=prompt))
        retrieved += found
    bare = retrieval_prompt([], tokenizer, max_tokens, template)
    if prompted and all(record.prompt == bare for record in prompted):
        raise UserError(
            f"no retrieved caption fits in a prompt of {max_tokens} tokens after the template {template!r}; "
            "raise --retrieval-prompt-tokens (at most half the decoder's positions after the prefix) or shorten "
            "the template"
        )
    return prompted, retrieved, exclusion
