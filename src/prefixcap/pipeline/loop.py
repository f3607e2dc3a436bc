"""The caption loop: units of images -> batches -> captions -> results in input order, the one loop
every way of captioning runs.

`caption_batch` is its step: one model batch of uint8 pixels (or stored image embeddings) and a
checked `CaptionRequest` -> each image's captions, reranked and wrapped in the caption text. The
server's batcher and a Ray actor call it on the batches they form. `CaptionLoop` streams units of
sources through the loader (`prefixcap.inputs.loader`), calls the step on every batch, and hands
each unit over once complete, with hooks for progress and failures. Its drivers and sinks: the
Python API (`Captioner`), output files and folder parts (`prefixcap.jobs`), sidecar files and
evaluation results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from prefixcap.errors import ImageLoadError
from prefixcap.inputs.images import ImageSource
from prefixcap.inputs.loader import ImageLoader, chunked, is_whole_shard
from prefixcap.options import CaptionRequest

T = TypeVar("T")
Outcome = list[str] | ImageLoadError  # an image's captions, or why it has none


class RankedCaptions(list[str]):
    """An image's captions sorted best first by a reranker, with their `scores` in the same order.
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


class RetrievedCaptions(list[str]):
    """An image's captions with what its prompt was made of (`retrieved`: the datastore captions
    with their scores, a `prefixcap.retrieval.Retrieved`, or its JSON records when read back from a
    part file), and a reranker's `scores` when reranked.
    A plain list of captions everywhere else; outputs write `retrieved` where they can."""

    def __init__(self, captions: Iterable[str], retrieved: Any, scores: Iterable[float] | None = None):
        super().__init__(captions)
        self.retrieved = retrieved
        if scores is not None:
            self.scores = list(scores)


def caption_batch(
    model: Any,
    request: CaptionRequest,
    *,
    pixels: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    prompts: Sequence[str | None] | None = None,
) -> list[list[str]]:
    """One model batch: the captions of uint8 `pixels` (or of stored `image_embeds`) per image,
    between the request's prefix and suffix, best first by its reranker (as `RankedCaptions`, which
    carry the scores; the reranker scores the captions as written). `prompts` gives each image its
    own prompt (a dataset's records'); otherwise the request's prompt applies, or with the request's
    `retrieval` the captions each image retrieves (returned with them, as `RetrievedCaptions`, if
    it asks to show them)."""
    if isinstance(request.rerank, str):
        raise TypeError(f"rerank {request.rerank!r} is a name: load the reranker it names before captioning")
    if request.rerank is not None and pixels is None:
        raise ValueError("reranking scores the images themselves; stored image embeddings cannot be reranked")
    retrieval, found = request.retrieval, None
    if retrieval is not None:
        if prompts is not None:
            raise ValueError("retrieval makes each image's prompt; per-image prompts cannot be given with it")
        embeds, prompts, found = retrieval.prepare(model, request, pixels=pixels, image_embeds=image_embeds)
        captions = model.caption(image_embeds=embeds, request=request, prompts=prompts)
    else:
        captions = model.caption(pixels=pixels, image_embeds=image_embeds, request=request, prompts=prompts)
    captions = [[request.text.wrap(caption) for caption in per_image] for per_image in captions]
    if request.rerank is not None:
        scores = request.rerank(pixels, captions)
        captions = [RankedCaptions.ranked(texts, scored) for texts, scored in zip(captions, scores, strict=True)]
    if found is None or not retrieval.show:
        return captions
    return [
        RetrievedCaptions(texts, retrieved, getattr(texts, "scores", None))
        for texts, retrieved in zip(captions, found, strict=True)
    ]


class CaptionLoop:
    """Captions units of image sources with `model` and `request`: the loader decodes the next
    batches (in `workers` threads, or DataLoader worker processes with `processes`) while the model
    captions the current one. `progress` (a tqdm bar, or anything with `update(n)`) counts images,
    and `on_failure` sees each unreadable image as it is found."""

    def __init__(
        self,
        model: Any,
        loader: ImageLoader,
        request: CaptionRequest,
        *,
        batch_size: int,
        workers: int = 4,
        processes: bool = False,
        progress: Any = None,
        on_failure: Callable[[ImageLoadError], None] | None = None,
    ):
        self.model, self.loader, self.request = model, loader, request
        self.batch_size, self.workers, self.processes = batch_size, workers, processes
        self.progress, self.on_failure = progress, on_failure

    def run(
        self, units: Iterable[Sequence[ImageSource]], prompts: Sequence[Sequence[str | None]] | None = None
    ) -> Iterator[tuple[int, list[tuple[Any, Outcome]]]]:
        """Yield each (unit index, its (source, captions or failure) in input order) once complete;
        with processes, units complete in about (not exactly) their order. A shard typed as
        `LocalPath`/`RemoteShard` yields ("shard#member", ...) for each of its images. `prompts`:
        one per source of each unit (units of whole shards take none)."""
        batches = self.loader.batches(
            units, batch_size=self.batch_size, workers=self.workers, processes=self.processes,
            pin_memory=self.processes and self.model.device.type == "cuda",
        )  # fmt: skip
        pending: dict[int, list[tuple[Any, Outcome]]] = {}  # unit -> its results so far
        for batch in batches:
            # 1. Caption the readable images; the failed ones keep their place with their error.
            results = pending.setdefault(batch.unit, [])
            batch_prompts = None
            if prompts is not None:
                unit_prompts = prompts[batch.unit][len(results) : len(results) + len(batch.keys)]
                batch_prompts = [unit_prompts[position] for position in batch.readable]
            captions = iter(
                caption_batch(self.model, self.request, pixels=batch.pixels, prompts=batch_prompts)
                if batch.pixels is not None
                else []
            )
            for position, key in enumerate(batch.keys):
                failure = batch.failures.get(position)
                if failure is not None and self.on_failure is not None:
                    self.on_failure(failure)
                results.append((key, failure if failure is not None else next(captions)))
            if self.progress is not None:
                self.progress.update(len(batch.keys))
            # 2. Hand over the unit once its last batch is done.
            if batch.last:
                yield batch.unit, pending.pop(batch.unit)

    def stream(
        self, sources: Iterable[ImageSource], prompts: Sequence[str | None] | None = None
    ) -> Iterator[tuple[Any, Outcome]]:
        """(source, captions or failure) for every source, in input order, for arbitrarily long
        inputs: units of one batch each (each whole shard a unit of its own). `prompts`: one per
        source (then no source may be a whole shard)."""
        if prompts is None:
            yield from in_order(self.run(group(sources, self.batch_size)))
            return
        units = list(chunked(sources, self.batch_size))
        if any(is_whole_shard(source) for unit in units for source in unit):
            raise ValueError("per-image prompts need image sources, not whole shards")
        yield from in_order(self.run(units, list(chunked(prompts, self.batch_size))))


def group(sources: Iterable[ImageSource], size: int) -> Iterator[list[ImageSource]]:
    """Units of at most `size` consecutive images; each shard is a unit of its own (it is read as
    one stream)."""
    unit: list[ImageSource] = []
    for source in sources:
        if unit and (len(unit) == size or is_whole_shard(source) or is_whole_shard(unit[-1])):
            yield unit
            unit = []
        unit.append(source)
    if unit:
        yield unit


def in_order(completed: Iterable[tuple[int, list[T]]]) -> Iterator[T]:
    """The items of units 0, 1, 2, ... in that order, from (unit index, its items) pairs that come
    in about that order; the few units that complete early wait here for their predecessors."""
    waiting: dict[int, list[T]] = {}
    next_index = 0
    for index, items in completed:
        waiting[index] = items
        while next_index in waiting:
            yield from waiting.pop(next_index)
            next_index += 1
