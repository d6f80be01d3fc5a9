"""The batching scheduler: one thread owns the model; concurrent requests share its forward passes.

How a request travels:
1. ``Engine.submit`` (called on the event loop) puts the request's sequences (prompts x n) in a bounded FIFO
   queue, or raises ResourceExhausted when the queue is full.
2. The engine thread runs a loop. Between two decode steps it admits waiting requests whole (every sequence of a
   request joins at the same step, so a request is served by one policy version), as long as the running batch
   stays within ``max_batch_size`` sequences: continuous batching. The newcomers' prompts are prefilled together
   (left padding, padding-independent position ids, identical prompts prefilled once) and their KV cache is
   merged into the running batch's cache (the shorter one is left-padded with masked zeros).
3. Each decode step feeds every running sequence its last token, samples the next one per row with the row's
   own parameters and ``torch.Generator`` (see :mod:`rlhf.generation.sampling`), and checks EOS, stop strings
   and max_new_tokens. Finished, cancelled and expired sequences leave the batch at once: their rows are dropped
   from the KV cache (``batch_select_indices``) and cache columns that only padding uses any more are cut.
4. A weight swap is applied by the engine thread between steps, when the running batch is empty: while a swap
   is pending no new request is admitted, the running ones finish on the old weights, then the swap happens and
   admission resumes on the new version. So no sample, and no response, ever mixes versions.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
import time
from collections import deque

import torch
from transformers import DynamicCache

from rlhf.core.errors import ResourceExhausted, ServiceError, Unavailable
from rlhf.core.models import position_ids_from_mask
from rlhf.generation import metrics as m
from rlhf.generation.kv_cache import concat_caches, left_pad, pad_cache_left, trim_cache_left
from rlhf.generation.requests import (
    CANCELLED,
    LENGTH,
    STOP,
    STOP_STRING,
    EngineRequest,
    Sequence,
    StreamDelta,
)
from rlhf.generation.sampling import sample_rows

log = logging.getLogger("rlhf.generation.engine")


class PendingSwap:
    def __init__(self, tensors: dict[str, torch.Tensor], version: int):
        self.tensors = tensors
        self.version = version
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class Engine:
    """Owns the model on one thread; see the module docstring for the scheduling rules."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        batch_wait_ms: float = 5.0,
        torch_threads: int | None = None,
        policy_version: int = 0,
    ):
        self.model = model
        self.tokenizer = tokenizer  # used on the engine thread only (decoding)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait_ms / 1000.0
        self.torch_threads = torch_threads
        self.policy_version = policy_version
        m.POLICY_VERSION.set(policy_version)
        self.state = model.state_dict()  # views of the parameters: copy_ into them swaps the weights
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = set()
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(x) for x in source)
        self.eos_ids = frozenset(eos)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"

        self._cv = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._waiting_rows = 0
        self._swap: PendingSwap | None = None
        self._stopping = False
        # batch state, touched by the engine thread only
        self._rows: list[Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (batch, cache_len)
        self._next: torch.Tensor | None = None  # (batch,) last sampled token, not yet fed
        self._pos: torch.Tensor | None = None  # (batch,) position id of _next
        self._touched: dict[int, EngineRequest] = {}  # requests this step changed, published after it
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)

    # ---- event-loop side ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def submit(self, request: EngineRequest) -> EngineRequest:
        rows = len(request.sequences)
        with self._cv:
            if self._stopping:
                raise Unavailable("the generation engine is shutting down")
            if self._waiting_rows + rows > self.max_queue and (self._waiting or self._rows):
                m.REQUESTS_REJECTED.labels("queue_full").inc()
                raise ResourceExhausted(
                    f"request queue full: {self._waiting_rows} sequences waiting, max_queue {self.max_queue}; "
                    "retry later"
                )
            self._waiting.append(request)
            self._waiting_rows += rows
            m.REQUESTS_WAITING.set(len(self._waiting))
            self._cv.notify_all()
        return request

    def request_swap(self, tensors: dict[str, torch.Tensor], version: int) -> concurrent.futures.Future:
        """Ask the engine thread to copy ``tensors`` into the model once the running batch is empty."""
        swap = PendingSwap(tensors, version)
        with self._cv:
            if self._swap is not None:
                raise ServiceError("another weight swap is pending")
            self._swap = swap
            self._cv.notify_all()
        return swap.future

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- engine thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._rows or self._swap):
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failed step fails its requests, never the engine
                log.exception("generation step failed")
                self._fail_running(ServiceError(f"generation failed: {type(exc).__name__}: {exc}"))
        self._fail_running(Unavailable("the generation server is shutting down"))
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            self._waiting_rows = 0
        for request in waiting:
            request._post(("error", Unavailable("the generation server is shutting down")))
        if self._swap:
            self._swap.future.set_exception(Unavailable("the generation server is shutting down"))

    def _step(self) -> None:
        self._reap()
        swap = self._swap
        if swap is not None and not self._rows:
            self._apply_swap(swap)
            return
        admitted: list[EngineRequest] = []
        if swap is None:
            admitted = self._admit()
        for r in admitted:
            self._touched[id(r)] = r
        if admitted:
            self._prefill(admitted)
        elif self._rows:
            self._decode()
        self._publish()

    def _admit(self) -> list[EngineRequest]:
        with self._cv:
            if not self._waiting:
                return []
            if not self._rows and self.batch_wait > 0:
                # Idle: give concurrent callers a moment to arrive and share the prefill.
                ready_at = self._waiting[0].submitted_at + self.batch_wait
                while not self._stopping and self._swap is None:
                    remaining = ready_at - time.perf_counter()
                    if remaining <= 0 or self._waiting_rows >= self.max_batch_size:
                        break
                    self._cv.wait(remaining)
            free = self.max_batch_size - len(self._rows)
            admitted = []
            while self._waiting and self._swap is None and len(self._waiting[0].sequences) <= free:
                request = self._waiting.popleft()
                self._waiting_rows -= len(request.sequences)
                if request.cancelled or request.expired(time.monotonic()):
                    self._finish_cancelled(request)
                    continue
                free -= len(request.sequences)
                admitted.append(request)
            m.REQUESTS_WAITING.set(len(self._waiting))
        return admitted

    def _attention_mask(self, mask: torch.Tensor, query_len: int):
        """The mask to pass: 2D when nothing is padded; with padding, the boolean 4D mask transformers would build
        for SDPA (True = attend), made here in a few tensor ops instead of its much slower vmap construction."""
        if not self._sdpa or bool(mask.all()):
            return mask
        keys = mask.bool()[:, None, None, :]  # (batch, 1, 1, kv)
        if query_len == 1:
            return keys
        kv = mask.shape[1]
        causal = torch.ones(query_len, kv, dtype=torch.bool).tril(kv - query_len)
        return keys & causal[None, None]

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=self._attention_mask(attention_mask, input_ids.shape[1]),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        if self._keep_arg:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1, :], out.past_key_values

    def _prefill(self, requests: list[EngineRequest]) -> None:
        rows = [s for r in requests for s in r.sequences]
        for r in requests:
            r.policy_version = self.policy_version
        unique: dict[tuple[int, ...], int] = {}
        index = [unique.setdefault(tuple(s.prompt_ids), len(unique)) for s in rows]
        ids, mask = left_pad([list(p) for p in unique], self.pad_id)
        m.BATCH_SIZE.observe(len(unique))
        logits, cache = self._forward(ids, mask, position_ids_from_mask(mask), DynamicCache())
        select = torch.tensor(index, dtype=torch.long)
        if len(unique) != len(rows) or index != list(range(len(rows))):
            cache.batch_select_indices(select)
            logits, mask = logits[select], mask[select]
        m.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in rows))
        pos = mask.sum(-1)
        # merge with the running batch: left-pad the shorter cache
        if self._rows:
            old_len, new_len = self._mask.shape[1], mask.shape[1]
            if old_len < new_len:
                pad_cache_left(self._cache, new_len - old_len)
                self._mask = torch.cat(
                    [self._mask.new_zeros((len(self._rows), new_len - old_len)), self._mask], 1
                )
            elif new_len < old_len:
                pad_cache_left(cache, old_len - new_len)
                mask = torch.cat([mask.new_zeros((len(rows), old_len - new_len)), mask], 1)
            concat_caches(self._cache, cache)
            self._mask = torch.cat([self._mask, mask], 0)
            self._pos = torch.cat([self._pos, pos], 0)
            self._next = torch.cat([self._next, torch.zeros(len(rows), dtype=torch.long)], 0)
            self._rows = self._rows + rows
        else:
            self._cache, self._mask, self._pos = cache, mask, pos
            self._next = torch.zeros(len(rows), dtype=torch.long)
            self._rows = rows
        now = time.perf_counter()
        for r in requests:
            r.first_token_at = now
            m.TIME_TO_FIRST_TOKEN.observe(now - r.submitted_at)
        self._sample(logits, first_new=len(self._rows) - len(rows))
        m.REQUESTS_RUNNING.set(len({id(s.request) for s in self._rows}))

    def _decode(self) -> None:
        batch = len(self._rows)
        m.BATCH_SIZE.observe(batch)
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], 1)
        logits, self._cache = self._forward(self._next[:, None], self._mask, self._pos[:, None], self._cache)
        self._pos = self._pos + 1
        self._sample(logits, first_new=0)

    def _sample(self, logits: torch.Tensor, first_new: int) -> None:
        """Sample for rows first_new.. of the batch (logits has one row per such batch row)."""
        rows = self._rows[first_new:]
        tokens, logprobs = sample_rows(logits, [s.request.params for s in rows], [s.generator for s in rows])
        m.GENERATION_TOKENS.inc(len(rows))
        self._next[first_new:] = torch.tensor(tokens, dtype=torch.long)
        for s, tok, lp in zip(rows, tokens, logprobs, strict=True):
            self._touched[id(s.request)] = s.request
            s.token_ids.append(tok)
            s.logprobs.append(lp)
            self._check_finished(s, tok)
        self._drop_finished()

    def _check_finished(self, s: Sequence, tok: int) -> None:
        params = s.request.params
        if tok in self.eos_ids:
            s.finish_reason = STOP
        elif params.stop:
            text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            cut = min((text.find(x) for x in params.stop if x in text), default=-1)
            if cut >= 0:
                s.finish_reason = STOP_STRING
                s.text = text[:cut]
                return
        if not s.finished and len(s.token_ids) >= params.max_new_tokens:
            s.finish_reason = LENGTH
        if s.finished:
            s.text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)

    def _reap(self) -> None:
        """Cancelled or expired requests leave the batch (and the queue) before the next step."""
        now = time.monotonic()
        changed = False
        for s in self._rows:
            if not s.finished and (s.request.cancelled or s.request.expired(now)):
                s.finish_reason = CANCELLED
                s.text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                self._touched[id(s.request)] = s.request
                changed = True
        if changed:
            self._drop_finished()
            self._publish()
        with self._cv:
            stale = [r for r in self._waiting if r.cancelled or r.expired(now)]
            for r in stale:
                self._waiting.remove(r)
                self._waiting_rows -= len(r.sequences)
            m.REQUESTS_WAITING.set(len(self._waiting))
        for r in stale:
            self._finish_cancelled(r)

    def _finish_cancelled(self, request: EngineRequest) -> None:
        for s in request.sequences:
            s.finish_reason = CANCELLED
        request.done = True
        request._post(("done", None))

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._next, self._pos = [], None, None, None, None
            m.REQUESTS_RUNNING.set(0)
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._cache.batch_select_indices(index)
        self._mask, self._next, self._pos = self._mask[index], self._next[index], self._pos[index]
        self._rows = [self._rows[i] for i in keep]
        # columns only padding uses any more (the longest prompts left) are cut from the cache
        used = self._mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            trim_cache_left(self._cache, start)
            self._mask = self._mask[:, start:]
        m.REQUESTS_RUNNING.set(len({id(s.request) for s in self._rows}))

    def _publish(self) -> None:
        """Send stream deltas and completions of the requests this step touched to the event loop."""
        touched, self._touched = self._touched, {}
        for r in touched.values():
            if r.done:
                continue
            if r.stream:
                deltas = [d for s in r.sequences if (d := self._delta(s)) is not None]
                if deltas:
                    r._post(("deltas", deltas))
            if all(s.finished for s in r.sequences):
                r.done = True
                m.REQUEST_DURATION.observe(time.perf_counter() - r.submitted_at)
                r._post(("done", None))

    def _delta(self, s: Sequence) -> StreamDelta | None:
        if s.final_sent or (s.sent_tokens == len(s.token_ids) and not s.finished):
            return None
        new_tokens = s.token_ids[s.sent_tokens :]
        new_logprobs = s.logprobs[s.sent_tokens :]
        if s.finished:
            text = s.text
        else:  # hold back what could be the start of a stop string or an incomplete character
            text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            hold = max((len(x) for x in s.request.params.stop), default=1) - 1
            text = text[: len(text) - hold] if hold > 0 else text
            text = text.rstrip("\ufffd")
        delta_text = text[s.sent_chars :]
        s.sent_tokens = len(s.token_ids)
        s.sent_chars = max(s.sent_chars, len(text))
        s.final_sent = s.finished
        return StreamDelta(
            s.prompt_index,
            s.sample_index,
            new_tokens,
            delta_text,
            new_logprobs,
            s.finish_reason,
            s.request.policy_version,
        )

    def _fail_running(self, exc: ServiceError) -> None:
        requests = {id(s.request): s.request for s in self._rows}
        requests.update(self._touched)
        self._touched = {}
        self._rows, self._cache, self._mask, self._next, self._pos = [], None, None, None, None
        m.REQUESTS_RUNNING.set(0)
        for r in requests.values():
            if not r.done:
                r.done = True
                r._post(("error", exc))

    def _apply_swap(self, swap: PendingSwap) -> None:
        try:
            for name, tensor in swap.tensors.items():
                self.state[name].copy_(tensor)
            self.policy_version = swap.version
            m.POLICY_VERSION.set(swap.version)
            swap.future.set_result(swap.version)
        except Exception as exc:  # verified beforehand; anything here is a bug, reported to the caller
            swap.future.set_exception(exc)
        finally:
            with self._cv:
                self._swap = None
                self._cv.notify_all()
