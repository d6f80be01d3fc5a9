"""The Text Generation Inference backend: the same PolicyService contract in front of a TGI server.

Prompts are rendered locally with rlhf.core.chat (the tokenizer of ``model``, which must be the model TGI serves)
and sent as text; each sample is one call of the ``text-generation`` client with ``details=True``, whose token ids
and logprobs are returned as they are. TGI batches the calls itself (continuous batching on its side).

Differences from the torch backend, each answered with a clear status:
- TGI's logprobs are those of the distribution it sampled from (after temperature, top-k and top-p): that is
  LOGPROBS_MODE_SAMPLING. LOGPROBS_MODE_TEMPERATURE is the same thing unless top-k/top-p truncate, so that
  combination is FAILED_PRECONDITION.
- Weights cannot be pushed (FAILED_PRECONDITION): redeploy TGI on the new checkpoint. The policy version is 0.
- n > 1 samples are n calls, each seeded by sample_seed(seed, prompt, sample) (no seed: TGI picks them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from rlhf.core.models import load_tokenizer, resolve_model_path
from rlhf.generation import metrics as m
from rlhf.generation.config import GenerationConfig
from rlhf.generation.requests import LENGTH, STOP, STOP_STRING, Sequence, StreamDelta
from rlhf.generation.sampling import MODE_TEMPERATURE, SamplingParams, sample_seed
from rlhf.generation.torch_backend import check_min_version
from rlhf.generation.validation import Limits, PreparedRequest
from rlhf.v1 import common_pb2

log = logging.getLogger("rlhf.generation.tgi")

FINISH_REASONS = {"length": LENGTH, "eos_token": STOP, "stop_sequence": STOP_STRING}


def tgi_kwargs(params: SamplingParams, sample_index: int, prompt_index: int = 0) -> dict:
    """Arguments of text_generation's generate / generate_stream for one sample."""
    # the client always asks for details=True (token ids and logprobs)
    kwargs = dict(max_new_tokens=params.max_new_tokens, stop_sequences=list(params.stop))
    if params.greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k or None,
            top_p=params.top_p if params.top_p < 1.0 else None,
        )
        if params.seed is not None:
            kwargs["seed"] = sample_seed(params.seed, prompt_index, sample_index)
    return kwargs


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


class TgiBackend:
    name = "tgi"
    supports_weight_updates = False
    policy_version = 0

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.tokenizer = None
        self.info: dict = {}
        self.loaded_at = Timestamp()
        self._inflight_rows = 0
        self._slots: asyncio.Semaphore | None = None

    def load(self) -> None:
        import requests

        if not self.config.tgi_url:
            raise ValueError("backend 'tgi' needs --tgi-url (the TGI server's base URL)")
        self.url = self.config.tgi_url.rstrip("/")
        self.tokenizer = load_tokenizer(resolve_model_path(self.config.model))
        deadline = time.monotonic() + self.config.tgi_timeout_seconds
        while True:  # TGI may still be loading its model: wait for /info like a readiness probe
            try:
                response = requests.get(f"{self.url}/info", timeout=5)
                response.raise_for_status()
                self.info = response.json()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TGI at {self.url} not reachable: {exc}") from exc
                time.sleep(1.0)
        self.loaded_at.GetCurrentTime()
        log.info("TGI at %s serves %s", self.url, self.info.get("model_id"))

    def close(self) -> None:
        pass

    def _client(self):
        from text_generation import AsyncClient

        return AsyncClient(self.url, timeout=int(self.config.tgi_timeout_seconds))

    def limits(self) -> Limits:
        cfg = self.config
        total = self.info.get("max_total_tokens")
        return Limits(
            max_batch_size=cfg.max_batch_size,
            max_prompt_tokens=min(cfg.max_prompt_tokens, int(self.info.get("max_input_tokens") or 1 << 30)),
            max_new_tokens_limit=cfg.max_new_tokens_limit,
            default_max_new_tokens=cfg.default_max_new_tokens,
            vocab_size=len(self.tokenizer),
            context_length=int(total) if total else None,
        )

    def model_info(self) -> common_pb2.ModelInfo:
        dtype = str(self.info.get("model_dtype", "")).removeprefix("torch.")
        return common_pb2.ModelInfo(
            name=str(self.info.get("model_id", "")),
            source=self.url,
            version="0",
            backend=self.name,
            dtype=dtype,
            vocab_size=len(self.tokenizer),
            max_prompt_tokens=self.limits().max_prompt_tokens,
            max_new_tokens=self.config.max_new_tokens_limit,
            max_batch_size=self.config.max_batch_size,
            loaded_at=self.loaded_at,
            has_chat_template=self.tokenizer.chat_template is not None,
            metadata={k: str(v) for k, v in self.info.items() if isinstance(v, str | int | float)},
        )

    # ---- generation -----------------------------------------------------------------------------------

    def _admit(self, req: PreparedRequest) -> None:
        check_min_version(req, self.policy_version)
        if req.params.logprobs_mode == MODE_TEMPERATURE and req.params.truncated and not req.params.greedy:
            m.REQUESTS_REJECTED.labels("unsupported").inc()
            raise FailedPrecondition(
                "params.logprobs_mode: the tgi backend returns logprobs of the truncated (top-k/top-p) "
                "distribution only; use LOGPROBS_MODE_SAMPLING or no top_k/top_p"
            )
        rows = req.num_sequences
        if self._inflight_rows + rows > self.config.max_batch_size + self.config.max_queue:
            m.REQUESTS_REJECTED.labels("queue_full").inc()
            raise ResourceExhausted(
                f"request queue full: {self._inflight_rows} sequences in flight to TGI; retry later"
            )
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_batch_size)

    def _rows(self, req: PreparedRequest):
        for i, (ids, text) in enumerate(zip(req.prompt_ids, req.prompt_texts, strict=True)):
            for j in range(req.params.n):
                yield i, j, ids, text

    async def _call(self, coro, time_remaining: float | None):
        from text_generation import errors

        try:
            async with self._slots:
                return await asyncio.wait_for(coro, time_remaining)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline expired before TGI answered") from None
        except errors.ValidationError as exc:
            raise InvalidArgument("prompts", f"rejected by TGI: {exc}") from None
        except (errors.OverloadedError, errors.RateLimitExceededError) as exc:
            raise ResourceExhausted(f"TGI is overloaded: {exc}") from None
        except (errors.GenerationError, errors.IncompleteGenerationError, errors.UnknownError) as exc:
            raise ServiceError(f"TGI failed: {type(exc).__name__}: {exc}") from None
        except ServiceError:
            raise
        except Exception as exc:  # connection refused, reset, bad gateway...
            raise Unavailable(f"TGI at {self.url} failed: {type(exc).__name__}: {exc}") from None

    async def _one(self, client, i, j, ids, text, params, time_remaining) -> Sequence:
        start = time.perf_counter()
        response = await self._call(client.generate(text, **tgi_kwargs(params, j, i)), time_remaining)
        details = response.details
        m.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - start)
        tokens = [t.id for t in details.tokens]
        seq = Sequence(None, i, j, list(ids), None)
        seq.token_ids = tokens
        seq.logprobs = [float(t.logprob) if t.logprob is not None else 0.0 for t in details.tokens]
        seq.finish_reason = FINISH_REASONS.get(
            getattr(details.finish_reason, "value", details.finish_reason), LENGTH
        )
        seq.text = cut_at_stop(response.generated_text, params.stop)
        return seq

    async def generate(self, req: PreparedRequest, time_remaining: float | None):
        self._admit(req)
        rows = list(self._rows(req))
        self._inflight_rows += len(rows)
        m.REQUESTS_RUNNING.inc()
        start = time.perf_counter()
        client = self._client()
        try:
            sequences = await asyncio.gather(
                *(self._one(client, i, j, ids, text, req.params, time_remaining) for i, j, ids, text in rows)
            )
        finally:
            self._inflight_rows -= len(rows)
            m.REQUESTS_RUNNING.dec()
        m.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in sequences))
        m.GENERATION_TOKENS.inc(sum(len(s.token_ids) for s in sequences))
        m.BATCH_SIZE.observe(len(rows))
        m.REQUEST_DURATION.observe(time.perf_counter() - start)
        return list(sequences), self.policy_version

    async def generate_stream(
        self, req: PreparedRequest, time_remaining: float | None
    ) -> AsyncIterator[list[StreamDelta]]:
        self._admit(req)
        rows = list(self._rows(req))
        self._inflight_rows += len(rows)
        m.REQUESTS_RUNNING.inc()
        queue: asyncio.Queue = asyncio.Queue()
        client = self._client()
        params = req.params

        async def pump(i, j, text):
            sent = 0
            ids: list[int] = []

            async def consume():
                nonlocal sent
                async for event in client.generate_stream(text, **tgi_kwargs(params, j, i)):
                    token = event.token
                    ids.append(token.id)
                    # decoded locally from all ids so far, like the torch backend (per-token texts of byte-level
                    # tokens do not concatenate to the text)
                    generated = self.tokenizer.decode(ids, skip_special_tokens=True)
                    finish = 0
                    if event.details is not None:
                        finish = FINISH_REASONS.get(
                            getattr(event.details.finish_reason, "value", event.details.finish_reason), LENGTH
                        )
                    safe = cut_at_stop(generated, params.stop) if finish else generated
                    if not finish:
                        if params.stop:
                            safe = safe[: max(0, len(safe) - max(len(s) for s in params.stop) + 1)]
                        safe = safe.rstrip("\ufffd")
                    delta, sent = safe[sent:], max(sent, len(safe))
                    m.GENERATION_TOKENS.inc()
                    await queue.put(
                        StreamDelta(i, j, [token.id], delta, [float(token.logprob or 0.0)], finish, 0)
                    )

            try:
                await self._call(consume(), time_remaining)
            except ServiceError as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.ensure_future(pump(i, j, text)) for i, j, _, text in rows]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, ServiceError):
                    raise item
                else:
                    yield [item]
        finally:
            for t in tasks:
                t.cancel()
            self._inflight_rows -= len(rows)
            m.REQUESTS_RUNNING.dec()
