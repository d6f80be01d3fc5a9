"""What a caller of the generation engine holds: a request, its sequences and the deltas it streams.

``EngineRequest`` is created on the event loop and handed to ``Engine.submit``; the engine thread appends tokens
to its ``Sequence`` rows and posts ``StreamDelta`` events back to the loop (``deltas()``), then the result.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from rlhf.generation.sampling import SamplingParams, row_generator
from rlhf.v1 import common_pb2

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
STOP_STRING = common_pb2.FINISH_REASON_STOP_STRING
CANCELLED = common_pb2.FINISH_REASON_CANCELLED


@dataclass
class Sequence:
    """One sample being generated (a row of the batch while it runs)."""

    request: EngineRequest
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: int = 0
    text: str = ""
    sent_tokens: int = 0  # streaming: tokens already sent
    sent_chars: int = 0  # streaming: characters of text already sent
    final_sent: bool = False  # streaming: the message with the finish reason went out

    @property
    def finished(self) -> bool:
        return self.finish_reason != 0


@dataclass
class StreamDelta:
    """What one streamed message carries: the new tokens of one sample."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: int
    policy_version: int


class EngineRequest:
    """A Generate call inside the engine: its sequences and the channel back to the event loop."""

    def __init__(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
        stream: bool = False,
        request_id: str = "",
    ):
        self.params = params
        self.deadline = deadline  # time.monotonic() value, or None
        self.stream = stream
        self.request_id = request_id
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.sequences = [
            Sequence(self, i, j, list(ids), row_generator(params.seed, j, i) if not params.greedy else None)
            for i, ids in enumerate(prompts)
            for j in range(params.n)
        ]
        self.policy_version = -1
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self.done = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s.prompt_ids) for s in self.sequences)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    def cancel(self) -> None:
        """Called from the event loop when the caller went away; the engine drops the rows at its next step."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _post(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def result(self) -> list[Sequence]:
        """Wait for every sequence to finish (unary Generate)."""
        while True:
            kind, payload = await self.events.get()
            if kind == "done":
                return self.sequences
            if kind == "error":
                raise payload

    async def deltas(self):
        """Yield lists of StreamDelta as the engine produces them (GenerateStream)."""
        while True:
            kind, payload = await self.events.get()
            if kind == "deltas":
                yield payload
            elif kind == "done":
                return
            elif kind == "error":
                raise payload
