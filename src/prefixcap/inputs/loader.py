"""The one path from image inputs to uint8 batches, for every entry point.

`ImageLoader.load` decodes, checks and resizes-crops one image (what the server calls, within its
memory budget); `ImageLoader.batches` streams whole lists of them, in worker threads (the Python
API, CLIPScore) or DataLoader worker processes (the `caption` command, `prepare`, `evaluate`).
Inputs come in units (a part of a captioning job, a chunk of a dataset): a batch never spans two
units, and the batch marked `last` completes its unit. An image that cannot be used travels as an
`ImageLoadError` in place of its pixels and never stops the stream.

What a source is: a path, image bytes, a PIL image or an array (see `images.load_image`). A plain
string may also name a member of a tar shard (`shard.tar#member.jpg`, as dataset records do). Only
typed names (`data.shards.LocalPath`, `RemoteShard`, from `expand_inputs` or `as_source`) may name
a whole WebDataset shard, whose images are then streamed in archive order: a name read from a
dataset file is never opened as a shard, a URL or a command.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prefixcap.errors import ImageLoadError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, source_label
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.inputs.sources import LocalPath, RemoteShard, is_member_reference, is_shard, read_image_bytes, read_shard

T = TypeVar("T")
_LOOKAHEAD = 2  # batches that worker threads decode ahead of the one being consumed


@dataclass
class Batch:
    unit: int  # index of the unit (a part, a chunk) these images come from
    keys: list[Any]  # per image, in order: its source as given, or "shard#member" for a shard's images
    pixels: torch.Tensor | None  # [readable images, 3, H, W] uint8, in order; None if none is readable
    failures: dict[int, ImageLoadError]  # position in `keys` -> why that image cannot be used
    last: bool  # whether this batch completes its unit

    @property
    def readable(self) -> list[int]:
        """The positions in `keys` that have pixels, in the order of `pixels`."""
        return [position for position in range(len(self.keys)) if position not in self.failures]

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) so that copies to the GPU can overlap compute."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


@dataclass(frozen=True)
class ImageLoader:
    """Decodes, checks and resizes-crops images with an `ImagePreprocessor` into [3, H, W] uint8
    pixels (normalised later, batched on the model's device). Picklable: it travels to workers.
    `max_pixels` refuses larger images before decoding them; `jpeg_draft` decodes JPEGs at a
    reduced scale that still covers the model's input size (faster; the pixels differ slightly)."""

    preprocessor: ImagePreprocessor
    max_pixels: int | None = field(default=DEFAULT_MAX_PIXELS, kw_only=True)
    jpeg_draft: bool = field(default=False, kw_only=True)

    def load(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """One image's pixels; raises `ImageLoadError` (named `name`, else after the source) for
        images that cannot be read, are over the pixel limit or that the image processor refuses."""
        source, name = _readable(source, name)
        try:
            return self.preprocessor.load_pixels(
                source, name=name, max_pixels=self.max_pixels, jpeg_draft=self.jpeg_draft
            )
        except ValueError as error:  # an image the image processor cannot handle
            raise ImageLoadError(source_label(source, name), f"cannot preprocess ({error})") from None

    def try_load(self, source: ImageSource, name: str | None = None) -> torch.Tensor | ImageLoadError:
        """`load`, with the failure returned instead of raised."""
        try:
            return self.load(source, name)
        except ImageLoadError as failure:
            return failure

    def batches(
        self,
        units: Iterable[Sequence[ImageSource]],
        *,
        batch_size: int,
        workers: int = 4,
        processes: bool = False,
        pin_memory: bool = False,
    ) -> Iterator[Batch]:
        """Batches of at most `batch_size` images, never spanning two units.

        processes=False: `workers` threads decode up to two batches ahead; batches come in input
                         order; `units` may be any (lazy) iterable, and sources stay in this process.
        processes=True:  `workers` DataLoader processes, worker w streams units w, w + workers, ...;
                         units complete about in order; the sources must be picklable.
        workers=0 decodes in the calling thread. `pin_memory` pins each batch's pixels for
        asynchronous copies to a GPU."""
        if processes:
            units = list(units)
            if units:
                dataset = _UnitImages(self, units, batch_size)
                workers = min(workers, len(units))
                yield from DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory)
            return
        for batch in self._threaded(units, batch_size, workers):
            yield batch.pin_memory() if pin_memory else batch

    def _threaded(self, units: Iterable[Sequence[ImageSource]], batch_size: int, workers: int) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(max_workers=workers) if workers else None
        submit = pool.submit if pool is not None else _run_now
        pending: deque[tuple[int, list[tuple[Any, Future]], bool]] = deque()  # batches being decoded
        try:
            for index, unit in enumerate(units):
                for items, last in _batches(_images(unit), batch_size):
                    pending.append((index, [(key, submit(self._outcome, key, item)) for key, item in items], last))
                    if len(pending) > _LOOKAHEAD:
                        yield _collect(*pending.popleft())
            while pending:
                yield _collect(*pending.popleft())
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _outcome(self, key: Any, item: ImageSource | ImageLoadError) -> torch.Tensor | ImageLoadError:
        """The pixels of one image of a unit, or why it has none."""
        if isinstance(item, ImageLoadError):
            return item
        return self.try_load(item, key if isinstance(key, str) else None)


class _UnitImages(IterableDataset):
    """The batches of `units` for DataLoader worker processes: worker w streams units w, w + n, ..."""

    def __init__(self, loader: ImageLoader, units: Sequence[Sequence[ImageSource]], batch_size: int):
        self.loader, self.units, self.batch_size = loader, units, batch_size

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        indices = range(len(self.units))
        for index in indices if worker is None else indices[worker.id :: worker.num_workers]:
            for items, last in _batches(_images(self.units[index]), self.batch_size):
                outcomes = [(key, self.loader._outcome(key, item)) for key, item in items]
                yield _collate(index, outcomes, last)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Plain consecutive chunks of `size` (the last may be shorter): unit i starts at item i * size."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def read_image(source: ImageSource) -> Image.Image:
    """A source (a dataset record's image: a file or a shard member) as an upright RGB PIL image,
    read as the loader reads it; raises `ImageLoadError`."""
    source, name = _readable(source, None)
    return load_image(source, name=name)


def _readable(source: ImageSource, name: str | None) -> tuple[ImageSource, str | None]:
    """A plain string naming a shard member (or a Parquet row) becomes that member's bytes, named
    by the string; a `datasets` image cell (`{"bytes", "path"}`) becomes its bytes, else its path."""
    if isinstance(source, dict) and {"bytes", "path"} & source.keys():
        data, path = source.get("bytes"), source.get("path")
        return (data if data is not None else LocalPath(path or "")), name or path or None
    if isinstance(source, str) and not isinstance(source, (LocalPath, RemoteShard)) and is_member_reference(source):
        return read_image_bytes(source), name or source
    return source, name


def is_whole_shard(source: ImageSource) -> bool:
    """Whether `source` is a whole shard: only names typed as LocalPath or RemoteShard can be."""
    return isinstance(source, (LocalPath, RemoteShard)) and is_shard(source)


def _images(unit: Sequence[ImageSource]) -> Iterator[tuple[Any, ImageSource | ImageLoadError]]:
    """(key, the image to load or why there is none) for every image of `unit`, in order."""
    for source in unit:
        if not is_whole_shard(source):
            yield source, source
            continue
        try:
            for name, data in read_shard(source):
                yield name, data if isinstance(data, bytes) else ImageLoadError(name, data)
        except ImageLoadError as failure:  # the shard itself: reported after the images read before
            yield source, failure


def _batches(items: Iterable[T], size: int) -> Iterator[tuple[list[T], bool]]:
    """(batch, is_last) for consecutive batches of `items`; an empty input gives one empty batch,
    so that even an empty unit is reported complete."""
    batch: list[T] = []
    for item in items:
        if len(batch) == size:
            yield batch, False
            batch = []
        batch.append(item)
    yield batch, True


def _collect(unit: int, futures: list[tuple[Any, Future]], last: bool) -> Batch:
    return _collate(unit, [(key, future.result()) for key, future in futures], last)


def _collate(unit: int, outcomes: list[tuple[Any, torch.Tensor | ImageLoadError]], last: bool) -> Batch:
    failures = {
        position: outcome for position, (_, outcome) in enumerate(outcomes) if isinstance(outcome, ImageLoadError)
    }
    good = [outcome for _, outcome in outcomes if not isinstance(outcome, ImageLoadError)]
    return Batch(unit, [key for key, _ in outcomes], torch.stack(good) if good else None, failures, last)


def _run_now(function: Callable[..., T], *args: Any) -> Future:
    """`function(*args)` in the calling thread, as a finished Future (for workers=0)."""
    future: Future = Future()
    future.set_result(function(*args))
    return future
