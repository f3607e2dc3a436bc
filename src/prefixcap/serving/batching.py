"""Dynamic batching: requests that arrive close together share one model call.

A model captions 16 images in far less than 16 times the time of one, so a server that runs
every request alone wastes most of its throughput. Each image becomes a job with its own future;
jobs wait in one queue per request's options (a batch runs with one caption request), and a single
worker thread runs the model so the event loop keeps accepting and answering requests meanwhile.

Once the model is free, the next batch starts when it is full, or when `max_wait_ms` has passed
without a new image (counting from the moment the model got free). So a burst of requests that
is still being decoded stays together, and under steady load the clients whose answers just went
out send their next request in time to share the next batch: batches stay full instead of
settling into alternating half-full groups. The added wait is at most max_batch_size * max_wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# run_batch(items, options) -> one result per item; called in the worker thread. `options` is what
# the items of a batch share, e.g. a frozen `CaptionRequest`.
BatchFunction = Callable[[list[Any], Hashable], list[Any]]


@dataclass
class _Job:
    item: Any  # one model input, e.g. one image's pixel tensor
    future: asyncio.Future = field(repr=False)  # resolved with this item's result
    arrived: float  # event-loop time when it was queued


class DynamicBatcher:
    """Group items from concurrent `submit` calls into batches for `run_batch`.

    A submitter that is cancelled (its client went away) leaves its futures cancelled: queued jobs
    are skipped, and a batch that is already running finishes for the other jobs in it.
    """

    def __init__(self, run_batch: BatchFunction, *, max_batch_size: int, max_wait_ms: float):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._queues: dict[Hashable, deque[_Job]] = {}  # one queue per set of options
        self._arrived = asyncio.Event()  # set whenever jobs are queued
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefixcap-model")
        self._task = asyncio.create_task(self._serve_forever(), name="prefixcap-batcher")

    async def stop(self) -> None:
        """Stop batching. Jobs still waiting fail with a clear error instead of hanging; uvicorn
        calls this only after open requests have drained."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._queues.values():
            _fail(queue, _shutting_down())
        self._queues.clear()
        if self._executor is not None:  # a batch already on the model thread runs to its end
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._task = self._executor = None

    async def submit(self, items: Sequence[Any], options: Hashable) -> list[Any]:
        """Results for `items`, in order, each computed in a batch of items sharing `options`."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        queue = self._queues.setdefault(options, deque())
        queue.extend(_Job(item, future, loop.time()) for item, future in zip(items, futures))
        self._arrived.set()
        # Cancelling this call cancels the futures; return_exceptions keeps a failed batch from
        # leaving "exception never retrieved" futures behind when a request has several images.
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # 1. sleep until something is queued
            while not self._queues:
                self._arrived.clear()
                await self._arrived.wait()
            # 2. serve the options group holding the oldest job
            key, queue = min(self._queues.items(), key=lambda entry: entry[1][0].arrived)
            # 3. let the batch fill until it is full, or until max_wait passes with no new image
            #    since the model got free
            free_since = loop.time()
            while len(queue) < self.max_batch_size and (timeout := self._linger(free_since, queue)) > 0:
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout)
            # 4. run it on the model thread and hand each job its result
            jobs = self._take(key, queue)
            if jobs:
                await self._run(jobs, key)

    def _linger(self, free_since: float, queue: deque[_Job]) -> float:
        """Seconds left to wait for more images: max_wait after the model got free or after the
        newest arrival, whichever is later, so that a burst still arriving is kept together."""
        return max(free_since, queue[-1].arrived) + self.max_wait - asyncio.get_running_loop().time()

    def _take(self, key: Hashable, queue: deque[_Job]) -> list[_Job]:
        """Up to max_batch_size live jobs from the front of `queue`; cancelled ones are dropped."""
        jobs = []
        while queue and len(jobs) < self.max_batch_size:
            job = queue.popleft()
            if not job.future.cancelled():
                jobs.append(job)
        if not queue:
            del self._queues[key]
        return jobs

    async def _run(self, jobs: list[_Job], options: Hashable) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, [job.item for job in jobs], options)
        except Exception as error:  # noqa: BLE001 - any failure fails the batch: each request gets it
            _fail(jobs, error)
            return
        except asyncio.CancelledError:  # stop() during the batch
            _fail(jobs, _shutting_down())
            raise
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():  # done = cancelled while the batch ran
                job.future.set_result(result)


def _fail(jobs: Iterable[_Job], error: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


def _shutting_down() -> RuntimeError:
    return RuntimeError("the server is shutting down")
