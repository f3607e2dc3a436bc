"""DynamicBatcher with a fake model: grouping, bounds, order, cancellation and failures."""

from __future__ import annotations

import asyncio
import threading

import pytest

from prefixcap.serving.batching import DynamicBatcher


class FakeModel:
    """Records every batch; `gate` (when given) holds each batch until the test releases it."""

    def __init__(self, gate: threading.Event | None = None, fail_on: object = None):
        self.batches: list[tuple[list, dict]] = []
        self.gate, self.fail_on = gate, fail_on
        self.started = threading.Event()

    def __call__(self, items: list, options: dict) -> list:
        self.batches.append((list(items), dict(options)))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.fail_on in items:
            raise RuntimeError("model failed")
        return [f"{item}:{dict(options).get('beams', 1)}" for item in items]


def shared(**values) -> tuple:
    """What a batch's items share, hashable as the batcher keys it (the server passes a frozen request)."""
    return tuple(sorted(values.items()))


def run(coroutine_fn, model: FakeModel, **batcher_kwargs):
    """Run `coroutine_fn(batcher)` with a started batcher, and stop it afterwards."""

    async def main():
        batcher = DynamicBatcher(model, **{"max_batch_size": 4, "max_wait_ms": 50, **batcher_kwargs})
        await batcher.start()
        try:
            return await coroutine_fn(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_batches_bounded_by_size():
    model = FakeModel()

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit([i], shared()) for i in range(6)))

    results = run(scenario, model)
    assert results == [[f"{i}:1"] for i in range(6)]
    assert [items for items, _ in model.batches] == [[0, 1, 2, 3], [4, 5]]


def test_a_latecomer_within_the_window_joins_the_batch():
    model = FakeModel()

    async def scenario(batcher):
        early = asyncio.create_task(batcher.submit(["early"], shared()))
        await asyncio.sleep(0.05)
        late = batcher.submit(["late"], shared())  # fills the batch, which then runs at once
        return await asyncio.gather(early, late)

    assert run(scenario, model, max_batch_size=2, max_wait_ms=5000) == [["early:1"], ["late:1"]]
    assert [items for items, _ in model.batches] == [["early", "late"]]


def test_batches_never_mix_generation_shared():
    model = FakeModel()

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit([i], shared(beams=1 + i % 2)) for i in range(6)))

    results = run(scenario, model)
    assert results == [[f"{i}:{1 + i % 2}"] for i in range(6)]
    for items, options in model.batches:
        assert {1 + item % 2 for item in items} == {options["beams"]}
    assert sorted(len(items) for items, _ in model.batches) == [3, 3]


def test_a_large_request_is_split_and_comes_back_in_order():
    model = FakeModel()
    results = run(lambda batcher: batcher.submit(list(range(10)), shared()), model, max_batch_size=3)
    assert results == [f"{i}:1" for i in range(10)]
    assert [len(items) for items, _ in model.batches] == [3, 3, 3, 1]


def test_a_cancelled_request_is_dropped_and_the_rest_are_answered():
    gate = threading.Event()
    model = FakeModel(gate)

    async def scenario(batcher):
        running = asyncio.create_task(batcher.submit(["a"], shared()))
        await asyncio.to_thread(model.started.wait, 10)  # batch ["a"] is on the model thread
        gone = asyncio.create_task(batcher.submit(["gone"], shared()))
        kept = asyncio.create_task(batcher.submit(["kept"], shared()))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client went away while it was queued
        gate.set()
        return await running, await kept, gone.cancelled()

    assert run(scenario, model, max_wait_ms=0) == (["a:1"], ["kept:1"], True)
    assert [items for items, _ in model.batches] == [["a"], ["kept"]]


def test_cancelling_inside_a_running_batch_leaves_the_others_alone():
    gate = threading.Event()
    model = FakeModel(gate)

    async def scenario(batcher):
        leaving = asyncio.create_task(batcher.submit(["leaving"], shared()))
        staying = asyncio.create_task(batcher.submit(["staying"], shared()))
        await asyncio.to_thread(model.started.wait, 10)
        leaving.cancel()
        gate.set()
        later = await batcher.submit(["later"], shared())
        return await staying, later, leaving.cancelled()

    assert run(scenario, model) == (["staying:1"], ["later:1"], True)
    assert [items for items, _ in model.batches] == [["leaving", "staying"], ["later"]]


def test_a_failed_batch_fails_its_requests_and_batching_goes_on():
    model = FakeModel(fail_on="bad")

    async def scenario(batcher):
        outcomes = await asyncio.gather(
            batcher.submit(["bad", "x"], shared()), batcher.submit(["y"], shared()), return_exceptions=True
        )
        return outcomes, await batcher.submit(["z"], shared())

    (first, second), after = run(scenario, model)
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert after == ["z:1"]


def test_stop_fails_waiting_requests_instead_of_leaving_them_hanging():
    gate = threading.Event()
    model = FakeModel(gate)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_ms=0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(["first"], shared()))
        waiting = asyncio.create_task(batcher.submit(["waiting"], shared()))
        await asyncio.to_thread(model.started.wait, 10)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        outcomes = await asyncio.gather(first, waiting, return_exceptions=True)
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(["late"], shared())
        return outcomes

    outcomes = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "shutting down" in str(o) for o in outcomes)


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0, "max_wait_ms": 1}, {"max_batch_size": 1, "max_wait_ms": -1}])
def test_bounds_are_checked(kwargs):
    with pytest.raises(ValueError):
        DynamicBatcher(FakeModel(), **kwargs)
