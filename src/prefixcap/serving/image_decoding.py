"""Decoding request images in worker threads, within a memory budget.

A 60 KB PNG can declare 8000 x 8000 pixels, and decoding it takes about 300 MB for a moment: a
few dozen such requests at once would take the machine's memory. So before an image is decoded,
its header tells what the decode will hold at its peak (`prefixcap.inputs.images.decode_bytes`), and it
waits until that fits in what the decodes already running leave of the budget. Small images still
decode side by side on every core; large ones take turns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from prefixcap.captioner import Captioner
from prefixcap.errors import ImageLoadError, ImageTooLargeError
from prefixcap.inputs.images import decode_bytes, open_image
from prefixcap.serving.errors import APIError

# JPEGs larger than this are decoded at reduced scale (PIL's draft mode, still at least the
# model's input size) even without --jpeg-draft: a full decode of a 48 MP photo holds 240 MB and
# takes a second for pixels that the model never sees. A 12 MP phone photo still decodes in full,
# exactly as the CLI decodes it.
LARGE_JPEG_PIXELS = 16_000_000
T = TypeVar("T")


def default_workers() -> int:
    """The CPUs this process may run on: decoding is CPU-bound, and more threads than cores
    would only add memory (each decoding thread keeps its own allocator arena)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class MemoryBudget:
    """A first-come, first-served semaphore over bytes. A reservation waits until it fits in what
    the others leave, and behind every earlier one, so that a stream of small images cannot starve
    a large one. A reservation larger than the whole budget waits until it can run alone."""

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"the memory budget must be at least 1 byte, got {total}")
        self.total = self.available = total
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int) -> int:
        """Reserve `amount` bytes (at most the whole budget); returns what to `release` later."""
        amount = min(amount, self.total)
        if not self._waiting and amount <= self.available:
            self.available -= amount
            return amount
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((amount, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted just before the cancellation
                self.release(amount)
            else:  # it may have been first in line, holding back others that fit
                self._grant()
            raise
        return amount

    def release(self, amount: int) -> None:
        self.available += amount
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            amount, granted = self._waiting[0]
            if not granted.cancelled():
                if amount > self.available:
                    return
                self.available -= amount
                granted.set_result(None)
            self._waiting.popleft()


class ImageDecoder:
    """Turns request images into model pixels with a Captioner's loader, in `workers` threads,
    with at most `memory_bytes` held by decodes at once (start it, then `await pixels(...)`)."""

    def __init__(self, captioner: Captioner, *, memory_bytes: int, workers: int):
        self.loader = captioner.loader
        self.draft_loader = dataclasses.replace(captioner.loader, jpeg_draft=True)  # for large JPEGs
        self.budget = MemoryBudget(memory_bytes)
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="prefixcap-decode")

    async def stop(self) -> None:
        """Stop taking work; decodes already running finish (their requests are being answered)."""
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
            self._executor = None

    async def pixels(self, name: str, data: bytes) -> torch.Tensor:
        """[3, H, W] uint8 pixels of image file `data`, or an APIError (400) saying why not."""
        try:
            # The header alone: cheap, and enough to refuse bad or oversized images unbudgeted.
            header = await self._run(functools.partial(open_image, data, max_pixels=self.loader.max_pixels, name=name))
            width, height = header.size
            draft = self.loader.jpeg_draft or (header.format == "JPEG" and width * height > LARGE_JPEG_PIXELS)
            cost = decode_bytes(header, self.loader.preprocessor.draft_size if draft else None)
            loader = self.draft_loader if draft else self.loader
            return await self._run(functools.partial(loader.load, data, name), cost)
        except ImageLoadError as error:
            kind = "too_many_pixels" if isinstance(error, ImageTooLargeError) else "invalid_image"
            raise APIError(400, kind, str(error)) from None

    async def _run(self, function: Callable[[], T], cost: int = 0) -> T:
        """`function()` in a worker thread, once `cost` bytes of the budget are free. The bytes
        are held until the thread is done, even when the request is abandoned meanwhile."""
        if self._executor is None:
            raise RuntimeError("the image decoder is not running")
        loop = asyncio.get_running_loop()
        reserved = await self.budget.acquire(cost) if cost else 0
        try:
            work = self._executor.submit(function)
        except BaseException:
            self.budget.release(reserved)
            raise
        if reserved:
            work.add_done_callback(lambda _: loop.call_soon_threadsafe(self.budget.release, reserved))
        return await asyncio.wrap_future(work)
