"""The micro-batcher on its own, with a fake forward pass that records its batches."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rlhf.core.errors import ResourceExhausted, Unavailable
from rlhf.reward.batcher import MicroBatcher


class FakeForward:
    """score = model offset + sequence length; records (model, lengths) of every batch; can be held."""

    def __init__(self):
        self.batches: list[tuple[str, list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, model, sequences):
        self.gate.wait(30)
        self.batches.append((model["name"], [len(s) for s in sequences]))
        return [model["offset"] + len(s) for s in sequences]


OLD = {"name": "old", "offset": 0.0}
NEW = {"name": "new", "offset": 1000.0}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_concurrent_callers_share_length_sorted_batches():
    fake = FakeForward()

    async def go():
        batcher = MicroBatcher(fake, max_batch_size=4, max_wait_ms=1000)
        batcher.start()
        lengths = [9, 1, 8, 2, 7, 3, 6, 5]
        results = await asyncio.gather(*(batcher.score(OLD, [[0] * n]) for n in lengths))
        await batcher.stop()
        return lengths, results

    lengths, results = run(go())
    assert [r[0] for r in results] == lengths  # every caller gets its own score back
    assert fake.batches == [("old", [1, 2, 3, 5]), ("old", [6, 7, 8, 9])]


def test_calls_bound_to_different_models_never_share_a_batch():
    fake = FakeForward()

    async def go():
        batcher = MicroBatcher(fake, max_batch_size=8, max_wait_ms=1000)
        batcher.start()
        out = await asyncio.gather(
            batcher.score(OLD, [[0] * 3, [0] * 4]), batcher.score(NEW, [[0] * 3]), batcher.score(OLD, [[0]])
        )
        await batcher.stop()
        return out

    old_a, new, old_b = run(go())
    assert old_a == [3, 4] and new == [1003] and old_b == [1]
    assert sorted(fake.batches) == [("new", [3]), ("old", [1, 3, 4])]


def test_token_budget_splits_batches():
    fake = FakeForward()

    async def go():
        batcher = MicroBatcher(fake, max_batch_size=8, max_batch_tokens=20, max_wait_ms=0)
        batcher.start()
        await batcher.score(OLD, [[0] * 10, [0] * 10, [0] * 10, [0] * 30])
        await batcher.stop()

    run(go())
    assert [lengths for _, lengths in fake.batches] == [[10, 10], [10], [30]]


def test_cancelled_callers_are_skipped_and_full_queue_is_refused():
    fake = FakeForward()

    async def go():
        batcher = MicroBatcher(fake, max_batch_size=1, max_wait_ms=0, max_queue=3)
        batcher.start()
        fake.gate.clear()  # hold the first forward pass so that the others queue up
        first = asyncio.ensure_future(batcher.score(OLD, [[0] * 1]))
        while not batcher.forward_passes:
            await asyncio.sleep(0.001)
        doomed = asyncio.ensure_future(batcher.score(OLD, [[0] * 2, [0] * 2]))
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match="queue full"):
            await batcher.score(OLD, [[0] * 3, [0] * 3])
        doomed.cancel()
        await asyncio.sleep(0.01)
        # the cancelled pairs are still queued but no longer count: 3 new ones fit under max_queue=3
        kept = asyncio.ensure_future(batcher.score(OLD, [[0] * 4] * 3))
        await asyncio.sleep(0.01)
        fake.gate.set()
        result = await first, await kept
        await batcher.stop()
        with pytest.raises(Unavailable):
            await batcher.score(OLD, [[0]])
        return result

    assert run(go()) == ([1], [4, 4, 4])
    assert [lengths for _, lengths in fake.batches] == [[1], [4], [4], [4]]  # the cancelled pairs never ran


def test_a_batch_waits_for_announced_calls_still_being_tokenized():
    """Past max_wait_ms, the batch still waits (up to 10x) for pairs of calls already received."""
    fake = FakeForward()

    async def go():
        batcher = MicroBatcher(fake, max_batch_size=8, max_wait_ms=200)
        batcher.start()

        async def slow_tokenizing_call():
            with batcher.announce(1):
                await asyncio.sleep(0.5)  # longer than max_wait_ms, shorter than 10x
                futures = batcher.submit(OLD, [[0] * 2])
            return await batcher.wait(futures)

        out = await asyncio.gather(batcher.score(OLD, [[0] * 1]), slow_tokenizing_call())
        await batcher.stop()
        return out

    assert run(go()) == [[1], [2]]
    assert fake.batches == [("old", [1, 2])]  # one forward pass for both
