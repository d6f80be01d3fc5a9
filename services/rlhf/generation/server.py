"""``rlhf serve generation``: the PolicyService servicer, a thin adapter over a backend (torch or TGI).

The servicer checks requests (rlhf.generation.validation), hands them to the backend and turns its results into
protos. The model is loaded in the ``load`` hook, so health reports NOT_SERVING (and RPCs UNAVAILABLE) until it
is ready.
"""

from __future__ import annotations

import asyncio
import logging

from rlhf.core.errors import FailedPrecondition, InvalidArgument, ServiceError
from rlhf.core.models import set_torch_threads
from rlhf.core.server import ServerHandle, ServiceDef, serve_forever
from rlhf.generation import metrics as m
from rlhf.generation.config import GenerationConfig
from rlhf.generation.tgi_backend import TgiBackend
from rlhf.generation.torch_backend import TorchBackend
from rlhf.generation.validation import PreparedRequest, prepare_request
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger("rlhf.generation")


def make_backend(config: GenerationConfig):
    if config.backend == "tgi":
        return TgiBackend(config)

    return TorchBackend(config)


def _time_remaining(context) -> float | None:
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None or remaining > 1e8 else max(0.0, remaining)


def sample_proto(s, version: int, return_prompt_ids: bool) -> policy_pb2.Sample:
    return policy_pb2.Sample(
        prompt_index=s.prompt_index,
        sample_index=s.sample_index,
        prompt_token_ids=s.prompt_ids if return_prompt_ids else (),
        token_ids=s.token_ids,
        text=s.text,
        logprobs=s.logprobs,
        finish_reason=s.finish_reason,
        policy_version=version,
    )


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, config: GenerationConfig, backend=None):
        self.config = config
        self.backend = backend or make_backend(config)

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def load(self, handle: ServerHandle) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.backend.load)
        m.POLICY_VERSION.set(self.backend.policy_version)
        info = self.backend.model_info()
        log.info(
            "serving %s (%s backend, %s, %d parameters), policy version %s",
            info.name,
            info.backend,
            info.dtype,
            info.num_parameters,
            info.version,
        )

    async def shutdown(self, handle: ServerHandle) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.backend.close)

    # ---- RPCs -----------------------------------------------------------------------------------------

    def _prepare(self, request) -> PreparedRequest:
        try:
            return prepare_request(request, self.backend.tokenizer, self.backend.limits())
        except InvalidArgument:
            m.REQUESTS_REJECTED.labels("invalid").inc()
            raise

    async def Generate(self, request, context):
        prepared = self._prepare(request)
        sequences, version = await self.backend.generate(prepared, _time_remaining(context))
        return policy_pb2.GenerateResponse(
            samples=[sample_proto(s, version, prepared.return_prompt_token_ids) for s in sequences],
            policy_version=version,
            prompt_tokens=sum(len(ids) for ids in prepared.prompt_ids) * prepared.params.n,
            completion_tokens=sum(len(s.token_ids) for s in sequences),
        )

    async def GenerateStream(self, request, context):
        prepared = self._prepare(request)
        async for deltas in self.backend.generate_stream(prepared, _time_remaining(context)):
            for d in deltas:
                yield policy_pb2.GenerateStreamResponse(
                    prompt_index=d.prompt_index,
                    sample_index=d.sample_index,
                    token_ids=d.token_ids,
                    text=d.text,
                    logprobs=d.logprobs,
                    finish_reason=d.finish_reason,
                    policy_version=d.policy_version,
                )

    async def UpdateWeights(self, request_iterator, context):
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("payload") != "metadata":
                raise InvalidArgument("metadata", "the first UpdateWeights message must carry the metadata")

            async def chunks():
                i = 0
                async for message in request_iterator:
                    i += 1
                    if message.WhichOneof("payload") != "chunk":
                        raise InvalidArgument(f"messages[{i}]", "only the first message may carry metadata")
                    yield message.chunk

            if not self.backend.supports_weight_updates:
                raise FailedPrecondition(
                    f"the {self.backend.name} backend cannot take weight updates; restart it on a new checkpoint"
                )
            response = await self.backend.update_weights(first.metadata, chunks())
        except InvalidArgument:
            m.WEIGHT_UPDATES.labels("invalid").inc()
            raise
        except FailedPrecondition:
            m.WEIGHT_UPDATES.labels("rejected").inc()
            raise
        except ServiceError:
            m.WEIGHT_UPDATES.labels("error").inc()
            raise
        except Exception:
            m.WEIGHT_UPDATES.labels("error").inc()
            raise
        m.WEIGHT_UPDATES.labels("ok").inc()
        return response

    async def GetModelInfo(self, request, context):
        return common_pb2.GetModelInfoResponse(model=self.backend.model_info())


def service_def(servicer: PolicyServicer) -> ServiceDef:
    return ServiceDef("rlhf.v1.PolicyService", servicer, policy_pb2_grpc.add_PolicyServiceServicer_to_server)


def serve(config: GenerationConfig) -> int:
    """Blocking: serve until SIGTERM/SIGINT."""
    set_torch_threads(config.torch_threads)
    servicer = PolicyServicer(config)
    serve_forever(config, [service_def(servicer)], load=servicer.load, on_shutdown=servicer.shutdown)
    return 0
