"""The local torch/transformers backend: the model, its batching engine, and versioned weight updates."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from rlhf.core.models import is_default_model, load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.generation import metrics as m
from rlhf.generation import weights as w
from rlhf.generation.config import GenerationConfig
from rlhf.generation.engine import Engine
from rlhf.generation.requests import CANCELLED, EngineRequest, Sequence, StreamDelta
from rlhf.generation.validation import Limits, PreparedRequest
from rlhf.v1 import common_pb2, policy_pb2

log = logging.getLogger("rlhf.generation.torch")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_min_version(req: PreparedRequest, serving: int) -> None:
    """min_policy_version is refused (not waited for): the trainer asks for the version its push returned."""
    if req.min_policy_version > serving:
        m.REQUESTS_REJECTED.labels("stale_version").inc()
        raise FailedPrecondition(
            f"min_policy_version: {req.min_policy_version} > serving policy version {serving}"
        )


def deadline_from(time_remaining: float | None) -> float | None:
    return None if time_remaining is None else time.monotonic() + time_remaining


class TorchBackend:
    name = "torch"
    supports_weight_updates = True

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.engine: Engine | None = None
        self.tokenizer = None
        self.spec: w.ModelSpec | None = None
        self.loaded_at = Timestamp()
        self._update_lock = asyncio.Lock()
        self.model_path: Path | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------

    def load(self) -> None:
        """Blocking: load the model and start the engine thread (runs in an executor during health NOT_SERVING)."""
        cfg = self.config
        self.model_path = resolve_model_path(cfg.model)
        log.info("loading %s (%s)", self.model_path, cfg.dtype)
        model = load_causal_lm(self.model_path, dtype=DTYPES[cfg.dtype])
        model.requires_grad_(False)
        self.tokenizer = load_tokenizer(self.model_path)
        self.spec = w.ModelSpec.of(model)
        self.engine = Engine(
            model,
            load_tokenizer(self.model_path),  # its own copy: the engine thread decodes while the loop encodes
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            batch_wait_ms=cfg.batch_wait_ms,
            torch_threads=cfg.torch_threads,
        )
        self.loaded_at.GetCurrentTime()
        self.engine.start()

    def close(self) -> None:
        if self.engine:
            self.engine.stop()

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def limits(self) -> Limits:
        cfg = self.config
        return Limits(
            max_batch_size=cfg.max_batch_size,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_new_tokens_limit=cfg.max_new_tokens_limit,
            default_max_new_tokens=cfg.default_max_new_tokens,
            vocab_size=self.engine.model.get_input_embeddings().weight.shape[0],
            context_length=getattr(self.engine.model.config, "max_position_embeddings", None),
        )

    def model_info(self) -> common_pb2.ModelInfo:
        model = self.engine.model
        source = (
            "builtin:smollm2-135m-instruct" if is_default_model(self.config.model) else str(self.model_path)
        )
        return common_pb2.ModelInfo(
            name=self.model_path.name,
            source=source,
            version=str(self.policy_version),
            backend=self.name,
            dtype=self.config.dtype,
            num_parameters=sum(p.numel() for p in model.parameters()),
            vocab_size=len(self.tokenizer),
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_new_tokens=self.config.max_new_tokens_limit,
            max_batch_size=self.config.max_batch_size,
            loaded_at=self.loaded_at,
            has_chat_template=self.tokenizer.chat_template is not None,
            metadata={"model_type": str(model.config.model_type), "path": str(self.model_path)},
        )

    # ---- generation -----------------------------------------------------------------------------------

    def _submit(self, req: PreparedRequest, time_remaining: float | None, stream: bool) -> EngineRequest:
        check_min_version(req, self.policy_version)
        request = EngineRequest(
            req.prompt_ids,
            req.params,
            loop=asyncio.get_running_loop(),
            deadline=deadline_from(time_remaining),
            stream=stream,
            request_id=req.request_id,
        )
        return self.engine.submit(request)

    async def generate(
        self, req: PreparedRequest, time_remaining: float | None
    ) -> tuple[list[Sequence], int]:
        request = self._submit(req, time_remaining, stream=False)
        try:
            sequences = await request.result()
        except asyncio.CancelledError:
            request.cancel()
            raise
        if any(s.finish_reason == CANCELLED for s in sequences):
            raise DeadlineExceeded("the request's deadline expired before its samples finished")
        return sequences, request.policy_version

    async def generate_stream(
        self, req: PreparedRequest, time_remaining: float | None
    ) -> AsyncIterator[list[StreamDelta]]:
        request = self._submit(req, time_remaining, stream=True)
        try:
            async for deltas in request.deltas():
                yield deltas
        finally:
            request.cancel()  # no-op when finished; stops the rows when the caller went away

    # ---- weight updates -------------------------------------------------------------------------------

    async def update_weights(self, metadata: policy_pb2.WeightsMetadata, chunks: AsyncIterator[bytes]):
        """Receive, verify and swap in new weights; returns an UpdateWeightsResponse."""
        start = time.perf_counter()
        async with self._update_lock:  # one update at a time; versions stay ordered
            current = self.policy_version
            if metadata.target_version <= current:
                raise FailedPrecondition(
                    f"metadata.target_version: {metadata.target_version} <= serving policy version {current}"
                )
            loop = asyncio.get_running_loop()
            num_bytes = 0
            if metadata.checkpoint_path:
                extra = 0
                async for chunk in chunks:
                    extra += len(chunk)
                if extra:
                    raise InvalidArgument("chunk", "send no chunks when metadata.checkpoint_path is set")
                tensors = await loop.run_in_executor(
                    None,
                    w.tensors_from_path,
                    metadata.checkpoint_path,
                    metadata.sha256,
                    self.config.weight_roots,
                )
                num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
            else:
                if not metadata.sha256:
                    raise InvalidArgument(
                        "metadata.sha256", "required when the weights are streamed as chunks"
                    )
                if metadata.total_bytes == 0:
                    raise InvalidArgument("metadata.total_bytes", "required when the weights are streamed")
                if metadata.total_bytes > self.config.max_update_bytes:
                    raise InvalidArgument(
                        "metadata.total_bytes",
                        f"{metadata.total_bytes} > max_update_bytes {self.config.max_update_bytes}",
                    )
                buffer = bytearray()
                hasher = hashlib.sha256()
                async for chunk in chunks:  # hashed as it arrives (hashlib releases the GIL)
                    if len(buffer) + len(chunk) > metadata.total_bytes:
                        raise InvalidArgument(
                            "chunk", f"more bytes than metadata.total_bytes {metadata.total_bytes}"
                        )
                    buffer += chunk
                    hasher.update(chunk)
                if len(buffer) != metadata.total_bytes:
                    raise InvalidArgument(
                        "metadata.total_bytes",
                        f"announced {metadata.total_bytes} bytes, received {len(buffer)}",
                    )
                digest = hasher.hexdigest()
                if digest != metadata.sha256.lower():
                    raise InvalidArgument("metadata.sha256", f"mismatch: received bytes hash to {digest}")
                tensors = await loop.run_in_executor(None, w.tensors_from_bytes, buffer)
                num_bytes = len(buffer)
                del buffer
            await loop.run_in_executor(
                None, lambda: w.verify_tensors(tensors, self.spec, partial=metadata.partial)
            )
            version = await asyncio.wrap_future(self.engine.request_swap(tensors, metadata.target_version))
            self.loaded_at.GetCurrentTime()
        seconds = time.perf_counter() - start
        m.WEIGHT_UPDATE_DURATION.observe(seconds)
        log.info("policy version %d now serving (%d tensors, %.2fs)", version, len(tensors), seconds)
        return policy_pb2.UpdateWeightsResponse(
            policy_version=version, num_tensors=len(tensors), num_bytes=num_bytes, seconds=seconds
        )
