"""Units of images on a Ray cluster, what captioning (`prefixcap.jobs.ray`) and encoding
(`prefixcap.jobs.ray_prepare`) share: the cluster (`RayCluster`: where it is, the actor pool's
size and resources, joining it or starting one on this machine), the CPU stage that decodes the
images (`decode_units`, tasks with prefixcap's `ImageLoader`), and `RayCluster.map_units`, which
runs a stage of actors over the decoded images and hands each unit back to this process once,
whole, however often Ray ran its parts.

Ray retries the work of a killed actor or a lost node; the images of a unit are keyed by their
position in it, so a result that Ray delivers twice counts once, and a unit with holes is never
handed over.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.loader import ImageLoader, chunked
from prefixcap.inputs.sources import LocalPath, RemoteShard, StoredImage
from prefixcap.jobs.ray_inputs import StoreObject, read_store_object
from prefixcap.system.extras import require

# Source kinds as they travel in a Ray Dataset (Arrow keeps strings, not their Python class): a
# name keeps the kind it was given (a file named like a URL stays a file; a plain string, such as
# a dataset record's image, is a file or a shard's member, never a whole shard, as in a local job).
_KINDS = {kind.__name__: kind for kind in (str, LocalPath, RemoteShard, StoredImage, StoreObject)}
LOCAL = "local"  # the address that starts a cluster on this machine for the job
_COLUMNS = ["unit", "position", "count", "key", "error"]  # what `decode_units` gives and the driver reads


@dataclass(kw_only=True)
class RayCluster:
    """A Ray cluster and the actor pool a job runs there. `address`: an existing cluster (`auto`,
    `ray://HOST:PORT`, `HOST:PORT`), or `local` (the default) for a cluster of this machine
    started for the job on 127.0.0.1. Nothing connects until there is work: a rerun of a
    finished job starts no cluster. Use it as a context manager, which disconnects (and stops a
    local cluster) at the end.

    `actors` actors of `gpus_per_actor` GPUs, `cpus_per_actor` CPUs and custom `resources` each
    (`{"captioner": 1}` places them on the nodes started with that resource). Decoding takes one
    CPU per task wherever the cluster has CPUs free; when the actors work on CPUs, Ray runs it
    inside the actors instead, which spares moving pixels between processes."""

    address: str = LOCAL
    actors: int = 1
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    resources: dict[str, float] | None = None
    _connected: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        require("ray", feature="Ray jobs (--ray)")

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect from the cluster; a local cluster started for the job stops."""
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False

    def map_units(
        self,
        units: Iterable[Sequence[Any]],
        *,
        loader: ImageLoader,
        batch_size: int,
        actor: type,
        actor_kwargs: dict[str, Any],
        result: str,
        progress: Any = None,
        on_failure: Callable[[ImageLoadError], None] | None = None,
    ) -> Iterator[tuple[int, list[tuple[str, Any]]]]:
        """Yield each (unit index, its (key, `result` cell or failure) in input order) once all its
        images are back, units in the order they complete. `units` are lists of typed sources
        (`LocalPath`, `RemoteShard`, `StoredImage`, `StoreObject`, or plain strings as a dataset's
        records name images), decoded by `loader` in tasks; then `actor(**actor_kwargs)`, an actor
        pool of this cluster's size and resources, maps batches of at most `batch_size` rows of
        `decode_units`'s columns, passing each row's `error` through and adding a `result` column
        (null where `error` is set). `progress` gets `update(n)` for new images, and `on_failure`
        each image that has none."""
        rows = [
            {"unit": index, "sources": [str(s) for s in unit], "kinds": [type(s).__name__ for s in unit]}
            for index, unit in enumerate(units)
        ]
        if not rows:
            return
        for name in {kind for row in rows for kind in row["kinds"]} - set(_KINDS):
            raise TypeError(f"a unit holds a {name}; Ray jobs take names ({', '.join(_KINDS)})")
        self._connect()
        import ray

        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        dataset = dataset.map_batches(
            decode_units,
            fn_kwargs={"loader": loader, "batch_size": batch_size},
            batch_size=1,
            **self._decode_resources(),
        )
        dataset = dataset.map_batches(
            actor,
            fn_constructor_kwargs=actor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_gpus=self.gpus_per_actor,
            num_cpus=self.cpus_per_actor,
            resources=self.resources,
            batch_size=batch_size,
        )
        pending: dict[int, _Unit] = {}
        done: set[int] = set()  # units handed over: rows that Ray delivers again are ignored
        try:
            # the columns are picked here, not by a Ray stage: its tasks would wait for CPUs the actors hold
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in table.select([*_COLUMNS, result]).to_pylist():
                    if row["unit"] in done:
                        continue
                    unit = pending.setdefault(row["unit"], _Unit(result))
                    if unit.add(row) and progress is not None:
                        progress.update(1)
                    if unit.complete:
                        outcomes = pending.pop(row["unit"]).outcomes()
                        for _, outcome in outcomes:
                            if isinstance(outcome, ImageLoadError) and on_failure is not None:
                                on_failure(outcome)
                        yield row["unit"], outcomes
                        done.add(row["unit"])
        except ray.exceptions.RayError as error:
            raise _user_error(error) from None
        if len(done) != len(rows):  # Ray lost rows: never hand over a unit with holes
            missing = sorted(set(range(len(rows))) - done)
            raise RuntimeError(f"Ray returned no complete result for units {missing[:10]}")

    def _decode_resources(self) -> dict[str, Any]:
        """What a decoding task asks for: one CPU wherever one is free, or, for actors that work on
        CPUs, exactly what the actors ask for, so that Ray fuses decoding into them (it fuses only
        stages with equal resources): a task of its own would wait for a CPU that the actors hold."""
        if self.gpus_per_actor:
            return {"num_cpus": 1}
        return {"num_cpus": self.cpus_per_actor, "resources": self.resources}

    def _connect(self) -> None:
        """Join the cluster at `address`, or start one on this machine (127.0.0.1 only)."""
        if self._connected:
            return
        import ray

        # The workers' logs stay in the cluster's log files (and dashboard); failures still come here.
        settings: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if self.address == LOCAL:
            settings |= {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False}
        else:
            settings["address"] = self.address
        try:
            ray.init(**settings)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise UserError(f"--ray {self.address}: cannot connect to the Ray cluster ({error})") from None
        self._connected = True
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # prefixcap shows its own progress line
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


@functools.cache
def torch_thread() -> ThreadPoolExecutor:
    """The one thread of this worker process that does torch work: an actor's loading and calls,
    and the decoding that Ray runs inside it. Ray Data builds an actor in one thread and calls it
    from another; torch's OpenMP runtime gives each thread that runs parallel work a team of its
    own, so work in both would keep two teams of threads on the actor's cores, competing.
    `on_torch_thread` runs a call there."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefixcap-torch")


def on_torch_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` on this process's torch thread; its result, or its exception raised here."""
    return torch_thread().submit(function, *args, **kwargs).result()


def decode_units(batch: dict[str, Any], *, loader: ImageLoader, batch_size: int) -> Iterator[dict[str, Any]]:
    """The CPU stage: the images of each unit (a row: `unit`, `sources`, `kinds`) decoded by
    prefixcap's loader, in batches of at most `batch_size` rows with columns `unit`, `position`
    (in the unit), `count` (the unit's number of images, on the rows of its last batch; -1
    before), `key` (the source, or "shard#member"), `pixels` and `error` (why an image has no
    pixels). A unit without images (an empty shard) gives one row at position -1."""
    for unit, sources, kinds in zip(batch["unit"], batch["sources"], batch["kinds"]):
        typed = [_KINDS[kind](source) for source, kind in zip(sources, kinds)]
        batches = _unit_batches(unit, typed, loader, batch_size)
        while (rows := on_torch_thread(next, batches, None)) is not None:  # the decoding's torch work, there
            yield rows


def _unit_batches(unit: int, sources: list[Any], loader: ImageLoader, batch_size: int) -> Iterator[dict[str, Any]]:
    """`decode_units`'s batches of one unit."""
    chunks = chunked(_decoded(sources, loader, batch_size), batch_size)
    chunk, position = next(chunks, []), 0
    while chunk is not None:
        following = next(chunks, None)  # None: `chunk` is the unit's last
        keys = [key for key, _ in chunk]
        errors = [outcome.reason if isinstance(outcome, ImageLoadError) else None for _, outcome in chunk]
        blank = _blank([outcome for _, outcome in chunk], loader)
        pixels = [blank if isinstance(outcome, ImageLoadError) else outcome for _, outcome in chunk]
        positions = list(range(position, position + len(chunk)))
        if not chunk:  # the end of a unit without images
            keys, positions, pixels, errors = [""], [-1], [blank], ["no images"]
        position += len(chunk)
        count = position if following is None else -1
        yield {
            "unit": np.full(len(keys), unit), "position": np.array(positions), "count": np.full(len(keys), count),
            "key": np.array(keys, dtype=object), "pixels": np.stack([p.numpy() for p in pixels]),
            "error": np.array(errors, dtype=object),
        }  # fmt: skip
        chunk = following


def _decoded(
    sources: list[Any], loader: ImageLoader, batch_size: int
) -> Iterator[tuple[str, torch.Tensor | ImageLoadError]]:
    """(key, pixels or why there are none) for each image of a unit, in order: object-store
    objects read through pyarrow, everything else by the loader as in a local job."""
    for in_store, run in itertools.groupby(sources, key=lambda source: isinstance(source, StoreObject)):
        if in_store:
            for source in run:
                for key, data in read_store_object(source):
                    yield key, data if isinstance(data, ImageLoadError) else loader.try_load(data, key)
            continue
        for decoded in loader.batches([list(run)], batch_size=batch_size, workers=0):
            good = iter(decoded.pixels if decoded.pixels is not None else [])
            for position, key in enumerate(decoded.keys):
                yield str(key), decoded.failures[position] if position in decoded.failures else next(good)


class _Unit:
    """The results of one unit so far, by position; a result that Ray delivers twice counts once."""

    def __init__(self, result: str) -> None:
        self.result = result  # the column that holds an image's result
        self.count = -1
        self.results: dict[int, tuple[str, Any, str | None]] = {}

    def add(self, row: dict[str, Any]) -> bool:
        """Record one row; whether it was new."""
        if row["count"] >= 0:
            self.count = row["count"]
        if row["position"] < 0 or row["position"] in self.results:
            return False
        self.results[row["position"]] = (row["key"], row[self.result], text_cell(row["error"]))
        return True

    @property
    def complete(self) -> bool:
        return self.count >= 0 and len(self.results) == self.count

    def outcomes(self) -> list[tuple[str, Any]]:
        return [
            (key, ImageLoadError(key, error) if error is not None else value)
            for key, value, error in (self.results[position] for position in range(self.count))
        ]


def _blank(outcomes: list[torch.Tensor | ImageLoadError], loader: ImageLoader) -> torch.Tensor:
    """Zero pixels in the place of an image that has none, shaped like the batch's images."""
    for outcome in outcomes:
        if isinstance(outcome, torch.Tensor):
            return torch.zeros_like(outcome)
    height, width = loader.preprocessor.output_size or (1, 1)
    return torch.zeros((3, height, width), dtype=torch.uint8)


def text_cell(value: Any) -> str | None:
    """A cell of a string column, None where empty: Ray may hand a column of nulls over as NaN."""
    return value if isinstance(value, str) else None


def failed_rows(batch: dict[str, Any]) -> list[str | None]:
    """Each row's `error` (why an earlier stage has no image for it), None for the good rows."""
    rows = len(next(iter(batch.values())))
    return [text_cell(error) for error in batch["error"]] if "error" in batch else [None] * rows


def _user_error(error: Exception) -> Exception:
    """The UserError inside a Ray failure (bad options, an unloadable model), else the failure."""
    cause: BaseException | None = error
    for _ in range(8):  # Ray wraps a task's error in its own, at each stage it crosses
        if cause is None or isinstance(cause, UserError):
            break
        cause = getattr(cause, "cause", None) or cause.__cause__
    return cause if isinstance(cause, UserError) else error
