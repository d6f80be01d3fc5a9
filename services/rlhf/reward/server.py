"""``rlhf serve reward``: the RewardService servicer, a thin adapter over scoring.py and batcher.py.

- Score: validate and tokenize the items (on a helper thread, with the model current at arrival), queue them in
  the micro-batcher, answer raw and normalized scores and the version of the model that scored them.
- LoadModel: load and trial-score the new checkpoint on a loader thread while the old model keeps serving, then
  swap the reference. Calls already queued finish on the old model; a checkpoint that fails is rejected
  (INVALID_ARGUMENT for a bad path, FAILED_PRECONDITION for a folder that does not load) and nothing changes.
- Started without --model, the server is SERVING but Score / GetModelInfo answer FAILED_PRECONDITION until a
  LoadModel call brings a model (the demo starts it before the reward model is trained).
- Auth (bearer tokens from auth_token / auth_token_file / RLHF_AUTH_TOKEN), TLS, health, reflection and the
  per-RPC metrics come from rlhf.core.server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch  # noqa: F401  (imported before run_server so it applies torch_threads)
from google.protobuf import message as pb_message
from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.core.errors import FailedPrecondition, InvalidArgument, ServiceError, require
from rlhf.core.models import set_torch_threads
from rlhf.core.server import ServerHandle, ServiceDef, serve_forever
from rlhf.reward import metrics, scoring
from rlhf.reward.batcher import MicroBatcher
from rlhf.reward.config import RewardConfig
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc

log = logging.getLogger("rlhf.reward")

TRUNCATION_NAMES = {
    reward_pb2.TRUNCATION_POLICY_REJECT: scoring.REJECT,
    reward_pb2.TRUNCATION_POLICY_TRUNCATE_PROMPT_LEFT: scoring.TRUNCATE_LEFT,
}


def rejection_reason(exc: ServiceError) -> str:
    """A bounded label for rlhf_reward_requests_rejected_total."""
    if isinstance(exc, InvalidArgument):
        return "too_long" if "tokens > limit" in exc.why or "no room for the prompt" in exc.why else "invalid"
    return exc.code.name.lower()


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, config: RewardConfig):
        self.config = config
        self.current: scoring.LoadedModel | None = None
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="reward-forward")
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="reward-tokenize")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="reward-load")
        self._load_lock: asyncio.Lock | None = None
        self.batcher = MicroBatcher(
            functools.partial(
                _score_batch,
                padding_side=config.padding_side,
                min_shared_prefix=config.shared_prefix_min_tokens,
            ),
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            executor=self._forward,
        )

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def load(self, handle: ServerHandle | None = None) -> None:
        set_torch_threads(self.config.torch_threads)
        self._load_lock = asyncio.Lock()
        self.batcher.start()
        if not self.config.model:
            log.warning("no --model: serving without a reward model until a LoadModel call brings one")
            return
        try:
            loaded = await self._run(self._loader, self._load, self.config.model, self.config.version)
        except Exception:
            metrics.MODEL_LOADS.labels("failure").inc()
            raise
        self._activate(loaded)
        log.info("serving reward model %s (version %s)", loaded.path, loaded.version)

    async def shutdown(self, handle: ServerHandle | None = None) -> None:
        await self.batcher.stop()
        for executor in (self._forward, self._tokenize, self._loader):
            executor.shutdown(wait=True)

    @staticmethod
    async def _run(executor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _load(self, path: str, version: str | None) -> scoring.LoadedModel:
        return scoring.load_model(
            path,
            version=version or None,
            dtype=self.config.dtype,
            max_tokens=self.config.max_tokens,
            device=self.config.device,
        )

    def _activate(self, loaded: scoring.LoadedModel) -> str | None:
        previous = self.current
        self.current = loaded  # one reference swap: calls bound to `previous` keep it until they finish
        metrics.MODEL_LOADS.labels("success").inc()
        if previous is not None and previous.version != loaded.version:
            try:
                metrics.MODEL_INFO.remove(previous.version)
            except KeyError:
                pass
        metrics.MODEL_INFO.labels(loaded.version).set(1)
        return previous.version if previous else None

    def _model(self) -> scoring.LoadedModel:
        if self.current is None:
            raise FailedPrecondition("no reward model is loaded: start with --model or call LoadModel first")
        return self.current

    # ---- RPCs -----------------------------------------------------------------------------------------

    async def Score(self, request, context):
        start = time.perf_counter()
        try:
            n = len(request.items)
            require(n > 0, "items", "empty: send at least one item")
            limit = self.config.max_pairs_per_request
            require(n <= limit, "items", f"{n} items > limit {limit} per request")
            if request.truncation == reward_pb2.TRUNCATION_POLICY_UNSPECIFIED:
                truncation = self.config.truncation
            elif request.truncation in TRUNCATION_NAMES:
                truncation = TRUNCATION_NAMES[request.truncation]
            else:
                raise InvalidArgument("truncation", f"unknown policy {request.truncation}")
            loaded = self._model()
            with self.batcher.announce(n):
                encoded = await self._run(
                    self._tokenize,
                    functools.partial(
                        scoring.encode_request,
                        loaded,
                        request.items,
                        truncation=truncation,
                        max_chars=self.config.max_text_chars,
                    ),
                )
                # queued before the announcement ends, so the collector never sees a gap
                futures = self.batcher.submit(loaded, [e.ids for e in encoded])
            scores = await self.batcher.wait(futures)
        except ServiceError as exc:
            metrics.REQUESTS_REJECTED.labels(rejection_reason(exc)).inc()
            metrics.REQUEST_DURATION.observe(time.perf_counter() - start)
            raise
        response = reward_pb2.ScoreResponse(model_version=loaded.version)
        for enc, score in zip(encoded, scores, strict=True):
            result = response.results.add(score=score, num_tokens=len(enc.ids), truncated=enc.truncated)
            normalized = loaded.normalize(score)
            if normalized is not None:
                result.normalized_score = normalized
            metrics.SCORES.observe(score)
        metrics.PAIRS_SCORED.inc(n)
        metrics.REQUEST_DURATION.observe(time.perf_counter() - start)
        return response

    async def GetModelInfo(self, request, context):
        return common_pb2.GetModelInfoResponse(model=self.model_info(self._model()))

    async def LoadModel(self, request, context):
        if not self.config.allow_load_model:
            raise FailedPrecondition("LoadModel is disabled on this server (allow_load_model: false)")
        path = request.path.strip()
        require(bool(path), "path", "empty: give a reward checkpoint folder")
        require(len(path) <= 4096, "path", f"{len(path)} chars > limit 4096")
        require("\x00" not in path, "path", "contains a NUL character")
        try:
            allowed, is_dir = self.config.path_allowed(path), Path(path).is_dir()
        except (OSError, ValueError) as exc:
            raise InvalidArgument("path", f"{path!r} is not usable ({exc})") from None
        require(allowed, "path", f"{path} is outside the allowed model_roots {self.config.model_roots}")
        require(is_dir, "path", f"{path} is not a folder the server can read")
        require(len(request.version) <= 200, "version", f"{len(request.version)} chars > limit 200")
        async with self._load_lock:
            try:
                loaded = await self._run(self._loader, self._load, path, request.version)
            except Exception as exc:
                metrics.MODEL_LOADS.labels("failure").inc()
                log.warning("rejected reward checkpoint %s: %s", path, exc)
                raise FailedPrecondition(
                    f"path: {path} cannot be served ({type(exc).__name__}: {exc}); still serving "
                    f"{self.current.version if self.current else 'no model'}"
                ) from None
            previous = self._activate(loaded)
        log.info("hot-swapped reward model %s -> %s (%s)", previous, loaded.version, path)
        return reward_pb2.LoadModelResponse(model=self.model_info(loaded), previous_version=previous or "")

    # ---- helpers --------------------------------------------------------------------------------------

    def model_info(self, loaded: scoring.LoadedModel) -> common_pb2.ModelInfo:
        loaded_at = Timestamp()
        loaded_at.FromNanoseconds(int(loaded.loaded_at * 1e9))
        extra = {
            k: str(v)
            for k, v in loaded.metadata.items()
            if k not in ("reward_mean", "reward_std", "version") and v is not None
        }
        extra.update(
            device=str(next(loaded.model.parameters()).device),
            prefix_sharing=str(loaded.prefix_sharing and self.config.shared_prefix_min_tokens > 0).lower(),
            truncation=self.config.truncation,
            micro_batch_size=str(self.config.max_batch_size),
            max_wait_ms=str(self.config.max_wait_ms),
        )
        return common_pb2.ModelInfo(
            name=Path(loaded.path).resolve().name,
            source=str(loaded.path),
            version=loaded.version,
            backend="torch",
            dtype=loaded.dtype,
            num_parameters=loaded.num_parameters,
            vocab_size=len(loaded.tokenizer),
            max_prompt_tokens=max(0, loaded.max_tokens - 1),
            max_new_tokens=loaded.max_tokens,
            max_batch_size=self.config.max_pairs_per_request,
            loaded_at=loaded_at,
            has_chat_template=loaded.tokenizer.chat_template is not None,
            reward_mean=loaded.reward_mean or 0.0,
            reward_std=loaded.reward_std or 0.0,
            metadata=extra,
        )


def _score_batch(
    loaded: scoring.LoadedModel, sequences: list[list[int]], padding_side: str, min_shared_prefix: int
) -> list[float]:
    return scoring.score_sequences(loaded, sequences, padding_side, min_shared_prefix)


class _Malformed:
    """Stands in for a request whose bytes do not parse, so the servicer can answer INVALID_ARGUMENT."""

    def __init__(self, error: str):
        self.error = error


def _safe_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except (pb_message.DecodeError, RuntimeError, ValueError) as exc:
            return _Malformed(f"not a valid {message_cls.DESCRIPTOR.full_name}: {exc}")

    return parse


def _reject_malformed(behavior):
    async def handler(request, context):
        if isinstance(request, _Malformed):
            metrics.REQUESTS_REJECTED.labels("malformed").inc()
            raise InvalidArgument("request", request.error)
        return await behavior(request, context)

    return handler


def add_to_server(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_RewardServiceServicer_to_server, but undecodable bytes get INVALID_ARGUMENT."""
    methods = {
        "Score": (reward_pb2.ScoreRequest, reward_pb2.ScoreResponse),
        "GetModelInfo": (common_pb2.GetModelInfoRequest, common_pb2.GetModelInfoResponse),
        "LoadModel": (reward_pb2.LoadModelRequest, reward_pb2.LoadModelResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _reject_malformed(getattr(servicer, name)),
            request_deserializer=_safe_parser(req),
            response_serializer=resp.SerializeToString,
        )
        for name, (req, resp) in methods.items()
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("rlhf.v1.RewardService", handlers),)
    )


def service_def(servicer: RewardServicer) -> ServiceDef:
    return ServiceDef("rlhf.v1.RewardService", servicer, add_to_server)


def serve(config: RewardConfig) -> int:
    """Blocking: serve until SIGTERM/SIGINT."""
    servicer = RewardServicer(config)
    serve_forever(config, [service_def(servicer)], load=servicer.load, on_shutdown=servicer.shutdown)
    return 0
