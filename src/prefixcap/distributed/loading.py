"""Streaming images to the model: DataLoader worker processes decode and preprocess whole parts
while the model captions the batches they have already delivered.

Each worker streams whole parts, so the images of a part arrive in input order and a batch never
spans two parts; a part is complete when its batch marked `last` has been captioned. Unreadable
images travel through as error records and never stop the stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prefixcap.data.shards import RemoteShard, as_source
from prefixcap.distributed.outputs import Result
from prefixcap.distributed.plan import Part
from prefixcap.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageSource
from prefixcap.preprocess import ImagePreprocessor, pixels_or_reason, stack_pixels

_IMAGE_KEYS = {extension.lstrip(".") for extension in IMAGE_EXTENSIONS}  # WebDataset sample keys


@dataclass
class Batch:
    part: int  # index of the Part these images belong to
    paths: list[str]  # every image of the batch, in input order
    pixels: torch.Tensor | None  # [good images, 3, H, W] uint8 for the readable ones, in order; None if none
    errors: dict[int, str]  # position in `paths` -> why that image could not be read
    last: bool  # whether this batch completes its part

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) so that copies to the GPU can overlap compute."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class PartImages(IterableDataset):
    """The images of `parts` as uint8 pixels (`ImagePreprocessor.pixels`), in batches of up to `batch_size`.

    With DataLoader workers, worker w streams parts w, w + num_workers, ...
    """

    def __init__(
        self,
        parts: Sequence[Part],
        preprocessor: ImagePreprocessor,
        *,
        batch_size: int,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
    ):
        self.parts = parts
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.jpeg_draft = jpeg_draft

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        parts = self.parts if worker is None else self.parts[worker.id :: worker.num_workers]
        for part in parts:
            for items, last in _batches(self._images(part), self.batch_size):
                yield _collate(part.index, items, last)

    def _images(self, part: Part) -> Iterator[tuple[str, torch.Tensor | str]]:
        """(path, pixels or the reason it failed) for every image of `part`, in order."""
        if not part.is_shard:
            for path in part.sources:
                yield path, self._preprocess(path, path)
            return
        spec = part.sources[0]
        try:
            for name, data in read_shard(spec):
                yield name, self._preprocess(data, name) if isinstance(data, bytes) else data
        except Exception as error:  # noqa: BLE001 - any failure of a remote or corrupt shard is reported, not raised
            yield spec, f"cannot read this shard ({_reason(error)})"

    def _preprocess(self, source: ImageSource, name: str) -> torch.Tensor | str:
        load = self.preprocessor.load_pixels
        return pixels_or_reason(
            name, lambda: load(source, name=name, max_pixels=self.max_pixels, jpeg_draft=self.jpeg_draft)
        )


def read_shard(spec: str) -> Iterator[tuple[str, bytes | str]]:
    """("spec#key.ext", encoded image) for each sample of a WebDataset shard, in archive order, or
    ("spec#key", reason) for a sample without an image. A `LocalPath` is opened as a file whatever
    its name; only a `RemoteShard` (a URL or `pipe:` command) goes to webdataset's opener. A plain
    string is read with `as_source`."""
    from webdataset import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    spec = as_source(spec)
    # closing a pipe raises if its command failed
    with gopen(spec) if isinstance(spec, RemoteShard) else open(spec, "rb") as stream:
        for sample in group_by_keys(tar_file_expander([{"url": spec, "stream": stream}])):
            key = next((key for key in sample if key in _IMAGE_KEYS), None)
            if key is None:
                members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
                yield f"{spec}#{sample['__key__']}", f"no image in this sample (has: {members})"
            else:
                yield f"{spec}#{sample['__key__']}.{key}", sample[key]


def caption_parts(
    captioner: Any,
    parts: Sequence[Part],
    *,
    batch_size: int,
    num_workers: int,
    progress: Any = None,
    **generation_kwargs: Any,
) -> Iterator[tuple[Part, list[Result]]]:
    """Caption `parts`, yielding each (part, its results in input order) once complete.

    With several workers, parts complete in about (not exactly) their order. `progress` is a tqdm
    bar or anything else with `update(n)`.
    """
    if not parts:
        return
    model = captioner.model
    dataset = PartImages(
        parts, model.preprocessor, batch_size=batch_size, max_pixels=captioner.max_pixels,
        jpeg_draft=captioner.jpeg_draft,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_size=None, num_workers=min(num_workers, len(parts)), pin_memory=model.device.type == "cuda"
    )
    by_index = {part.index: part for part in parts}
    pending: dict[int, list[Result]] = {}  # part index -> results so far
    for batch in loader:
        # 1. Caption the readable images; the failed ones keep their place as error records.
        captions = iter(captioner.caption_pixels(batch.pixels, **generation_kwargs) if batch.pixels is not None else [])
        results = pending.setdefault(batch.part, [])
        for position, path in enumerate(batch.paths):
            error = batch.errors.get(position)
            results.append(Result(path, error=error) if error is not None else Result(path, next(captions)))
        if progress is not None:
            progress.update(len(batch.paths))
        # 2. Hand over the part once its last batch is done.
        if batch.last:
            yield by_index[batch.part], pending.pop(batch.part)


def in_input_order(completed: Iterable[tuple[Part, list[Result]]]) -> Iterator[Result]:
    """The results of parts 0, 1, 2, ... in that order, from `caption_parts` over all the parts of
    a plan; the few parts that complete early wait here for their predecessors."""
    waiting: dict[int, list[Result]] = {}
    next_index = 0
    for part, results in completed:
        waiting[part.index] = results
        while next_index in waiting:
            yield from waiting.pop(next_index)
            next_index += 1


def _batches(items: Iterable[Any], size: int) -> Iterator[tuple[list[Any], bool]]:
    """(batch, is_last) for consecutive batches of `items`; an empty input gives one empty batch,
    so that even an empty part is reported complete."""
    batch: list[Any] = []
    for item in items:
        if len(batch) == size:
            yield batch, False
            batch = []
        batch.append(item)
    yield batch, True


def _collate(part: int, items: list[tuple[str, torch.Tensor | str]], last: bool) -> Batch:
    _, pixels, errors = stack_pixels([(position, result) for position, (_, result) in enumerate(items)])
    return Batch(part, [path for path, _ in items], pixels, errors, last)


def _reason(error: Exception) -> str:
    """The message of an error raised through webdataset, which appends its stream objects to
    the exception's args and " @ <stream>" to the message."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    message = str(error.args[0]).split(" @ ")[0] if error.args else ""
    if status := re.search(r": exit (\d+) \(read\)", message):  # a `pipe:` command failed
        return f"the command exited with status {status[1]}"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
