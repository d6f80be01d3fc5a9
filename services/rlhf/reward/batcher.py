"""Dynamic micro-batching of pairs across concurrent Score calls.

Every call puts its pairs (already token ids) in one queue, each pair tagged with the model the call was bound
to when it arrived. A single collector task waits until ``max_batch_size`` pairs are queued or the oldest has
waited ``max_wait_ms`` (a little longer while calls already received are still being tokenized), takes a window of queued pairs, groups them by model, sorts each group by length (so
rows of similar length share a batch and padding stays small), cuts it into batches of at most
``max_batch_size`` rows and ``max_batch_tokens`` padded tokens, and runs the forward passes one after another
on one worker thread (torch uses the intra-op threads). Pairs queued during a forward pass join the next one.

Because each pair carries its model, a hot swap never mixes models inside a call: calls that arrived before
the swap finish on the old weights, and the old model is freed once its last pair is scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from rlhf.core.errors import ResourceExhausted, Unavailable
from rlhf.reward import metrics

log = logging.getLogger("rlhf.reward.batcher")

# How many max_batch_size batches one collection window may hold: a wider window sorts better.
WINDOW_BATCHES = 4
# A batch waits up to this many times max_wait_ms for pairs of calls already received but still being tokenized
# (a burst of callers arrives faster than one thread tokenizes it).
INCOMING_WAIT_FACTOR = 10

ScoreFn = Callable[[object, list[list[int]]], list[float]]


@dataclass
class _Pending:
    model: object
    ids: list[int]
    future: asyncio.Future


def plan_batches(lengths: list[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches: sorted by length, each <= max_batch_size rows and <= max_batch_tokens
    padded tokens (rows x longest), a single over-long row still getting its own batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted: the newest row is the longest
        if current and (len(current) + 1 > max_batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class MicroBatcher:
    """Queue pairs from many callers; score them in length-sorted batches on one worker thread."""

    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        executor: Executor | None = None,
    ):
        self.score_fn = score_fn
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="reward-forward")
        self._pending: deque[_Pending] = deque()
        self._incoming = 0  # pairs of received calls still being tokenized (see announce)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.forward_passes = 0  # batches run so far (tests and the benchmark read it)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the collector in the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="reward-batcher")

    async def stop(self) -> None:
        """Stop collecting; callers still waiting get UNAVAILABLE."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(Unavailable("the reward server is shutting down"))
        metrics.QUEUE_DEPTH.set(0)
        if self._own_executor:
            self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def announce(self, n: int):
        """Tell the collector that ``n`` pairs are on their way (being tokenized), so that a batch about to start
        on an idle worker waits for them a little (at most ``INCOMING_WAIT_FACTOR`` x max_wait_ms)."""
        self._incoming += n
        try:
            yield
        finally:
            self._incoming -= n
            if self._wakeup is not None:
                self._wakeup.set()

    async def score(self, model, sequences: list[list[int]]) -> list[float]:
        """Raw scores of ``sequences`` with ``model``, in order (micro-batched with other callers)."""
        return await self.wait(self.submit(model, sequences))

    def submit(self, model, sequences: list[list[int]]) -> list[asyncio.Future]:
        """Queue ``sequences`` for ``model`` now; their futures resolve to the scores (see :meth:`wait`)."""
        if self._task is None or self._task.done():
            raise Unavailable("the reward batcher is not running")
        if len(self._pending) + len(sequences) > self.max_queue:
            # calls that gave up (deadline, cancelled) leave their pairs queued until the collector reaches
            # them: they do not count against the limit
            self._pending = deque(p for p in self._pending if not p.future.done())
            metrics.QUEUE_DEPTH.set(len(self._pending))
        if len(self._pending) + len(sequences) > self.max_queue:
            raise ResourceExhausted(
                f"reward queue full ({len(self._pending)} pairs waiting, limit {self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in sequences]
        self._pending.extend(_Pending(model, ids, f) for ids, f in zip(sequences, futures, strict=True))
        metrics.QUEUE_DEPTH.set(len(self._pending))
        self._wakeup.set()
        return futures

    @staticmethod
    async def wait(futures: list[asyncio.Future]) -> list[float]:
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:  # cancelled or failed: the collector skips what is still queued
                f.cancel()
            raise

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = loop.time()
            deadline, hard_deadline = first + self.max_wait, first + self.max_wait * INCOMING_WAIT_FACTOR
            while len(self._pending) < self.max_batch_size:
                now = loop.time()
                # past max_wait, keep waiting only for calls already received and still being tokenized
                remaining = (deadline if now < deadline or not self._incoming else hard_deadline) - now
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):  # the loop decides whether time is up
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            window: list[_Pending] = []
            while self._pending and len(window) < self.max_batch_size * WINDOW_BATCHES:
                p = self._pending.popleft()
                if not p.future.done():
                    window.append(p)
            metrics.QUEUE_DEPTH.set(len(self._pending))
            by_model: dict[int, list[_Pending]] = {}
            for p in window:
                by_model.setdefault(id(p.model), []).append(p)
            for group in by_model.values():
                for batch in plan_batches(
                    [len(p.ids) for p in group], self.max_batch_size, self.max_batch_tokens
                ):
                    await self._run_batch([group[i] for i in batch])

    async def _run_batch(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]  # callers gone while we ran the previous batch
        if not batch:
            return
        model = batch[0].model
        metrics.BATCH_SIZE.observe(len(batch))
        self.forward_passes += 1
        try:
            scores = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.score_fn, model, [p.ids for p in batch]
            )
        except Exception as exc:
            log.exception("forward pass of %d pairs failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, score in zip(batch, scores, strict=True):
            if not p.future.done():
                p.future.set_result(score)
