"""A blocking client of the policy generation service for the PPO trainer, the demo and benchmarks.

    with PolicyClient("127.0.0.1:50051") as policy:
        samples = policy.generate(["Tell a story"], max_new_tokens=48, temperature=0.7, n=4)
        version = policy.update_weights(version=1, checkpoint_path="/dev/shm/policy.safetensors")

Generate calls are retried with the one retry policy (UNAVAILABLE, RESOURCE_EXHAUSTED); weight updates are not
(a stream of chunks is not replayed behind the caller's back).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from rlhf.core.client import RetryPolicy, call_with_retry, make_channel
from rlhf.core.prompt_proto import make_prompt
from rlhf.generation import weights as w
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

LOGPROBS_MODES = {
    "temperature": policy_pb2.LOGPROBS_MODE_TEMPERATURE,
    "sampling": policy_pb2.LOGPROBS_MODE_SAMPLING,
}
CHUNK_BYTES = 4 * 2**20


def make_params(
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    n: int = 1,
    logprobs_mode: str = "temperature",
) -> policy_pb2.SamplingParams:
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}")
    params = policy_pb2.SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        n=n,
        logprobs_mode=LOGPROBS_MODES[logprobs_mode],
    )
    if seed is not None:
        params.seed = seed
    return params


class PolicyClient:
    """Blocking calls to a PolicyService at ``target`` (host:port)."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float = 600.0,
        retry: RetryPolicy | None = None,
        *,
        tls: bool = False,
        tls_ca_file: str | None = None,
        max_message_mb: int = 64,
    ):
        self.target = target
        self.channel = make_channel(
            target, token=token, tls=tls, tls_ca_file=tls_ca_file, max_message_mb=max_message_mb
        )
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate_response(
        self,
        prompts: Sequence,
        *,
        min_policy_version: int = 0,
        return_prompt_token_ids: bool = False,
        **params,
    ) -> policy_pb2.GenerateResponse:
        """The whole GenerateResponse (samples, policy_version, token counts)."""
        request = policy_pb2.GenerateRequest(
            prompts=[make_prompt(p) for p in prompts],
            params=make_params(**params),
            min_policy_version=min_policy_version,
            return_prompt_token_ids=return_prompt_token_ids,
        )
        return call_with_retry(
            lambda: self.stub.Generate(request, timeout=self.timeout), self.retry, "PolicyService.Generate"
        )

    def generate(
        self,
        prompts: Sequence,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        n: int = 1,
        logprobs_mode: str = "temperature",
        min_policy_version: int = 0,
        return_prompt_token_ids: bool = True,
    ) -> list[policy_pb2.Sample]:
        """Samples for ``prompts`` (str, chat messages or token ids each), ordered by prompt then sample."""
        response = self.generate_response(
            prompts,
            min_policy_version=min_policy_version,
            return_prompt_token_ids=return_prompt_token_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            n=n,
            logprobs_mode=logprobs_mode,
        )
        return list(response.samples)

    def generate_stream(
        self, prompts: Sequence, *, min_policy_version: int = 0, **params
    ) -> Iterator[policy_pb2.GenerateStreamResponse]:
        request = policy_pb2.GenerateStreamRequest(
            prompts=[make_prompt(p) for p in prompts],
            params=make_params(**params),
            min_policy_version=min_policy_version,
        )
        yield from self.stub.GenerateStream(request, timeout=self.timeout)

    def update_weights(
        self,
        *,
        version: int,
        state_dict: dict | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        partial: bool = False,
        sha256: str = "",
    ) -> int:
        """Push new weights as ``version``; returns the version now serving.

        ``checkpoint_path``: a .safetensors file or HF folder the server can read (e.g. under /dev/shm on the same
        host: the fast path). ``state_dict``: serialized as safetensors and streamed in 4 MiB chunks with its
        SHA-256.
        """
        return self.update_weights_response(
            version=version,
            state_dict=state_dict,
            checkpoint_path=checkpoint_path,
            partial=partial,
            sha256=sha256,
        ).policy_version

    def update_weights_response(
        self,
        *,
        version: int,
        state_dict: dict | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        partial: bool = False,
        sha256: str = "",
    ) -> policy_pb2.UpdateWeightsResponse:
        if (state_dict is None) == (checkpoint_path is None):
            raise ValueError("pass exactly one of state_dict and checkpoint_path")
        if checkpoint_path is not None:
            metadata = policy_pb2.WeightsMetadata(
                target_version=version, checkpoint_path=str(checkpoint_path), partial=partial, sha256=sha256
            )
            messages = iter([policy_pb2.UpdateWeightsRequest(metadata=metadata)])
            return self.stub.UpdateWeights(messages, timeout=self.timeout)
        data = w.serialize_state_dict(state_dict)
        metadata = policy_pb2.WeightsMetadata(
            target_version=version,
            sha256=sha256 or w.sha256_hex(data),
            total_bytes=len(data),
            partial=partial,
        )

        def messages():
            yield policy_pb2.UpdateWeightsRequest(metadata=metadata)
            for chunk in w.chunked(data, CHUNK_BYTES):
                yield policy_pb2.UpdateWeightsRequest(chunk=chunk)

        return self.stub.UpdateWeights(messages(), timeout=self.timeout)

    def model_info(self) -> common_pb2.ModelInfo:
        return call_with_retry(
            lambda: self.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=self.timeout),
            self.retry,
            "PolicyService.GetModelInfo",
        ).model
