"""The reward scoring SDK: ``RewardClient`` (blocking) and ``AsyncRewardClient`` (asyncio).

    from rlhf.reward.client import RewardClient

    with RewardClient("reward.example:50052", token=os.environ["RLHF_AUTH_TOKEN"]) as rm:
        scores = rm.score([("Tell a joke.", "Why did the chicken..."), (chat_messages, "Sure!")])

A prompt is a string (one user turn) or chat messages (``[{"role": "user", "content": ...}, ...]``); the server
renders it with the reward model's chat template exactly as the reward-model trainer did. ``score_detailed``
also takes whole conversations ending with an assistant turn and returns the ``ScoreResponse`` (normalized
scores, token counts, truncation flags and the model version).

Every call has a deadline (``timeout`` seconds per attempt) and is retried with exponential backoff on
UNAVAILABLE (server restarting or loading) and RESOURCE_EXHAUSTED (queue full) per ``retry``
(``rlhf.core.client.RetryPolicy``; ``RetryPolicy(retry_timeout=0)`` disables retries).
"""

from __future__ import annotations

from collections.abc import Mapping

from rlhf.core.client import RetryPolicy, acall_with_retry, call_with_retry, make_channel
from rlhf.core.prompt_proto import make_messages, make_prompt
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc

TRUNCATION = {
    None: reward_pb2.TRUNCATION_POLICY_UNSPECIFIED,
    "reject": reward_pb2.TRUNCATION_POLICY_REJECT,
    "truncate_left": reward_pb2.TRUNCATION_POLICY_TRUNCATE_PROMPT_LEFT,
}


def make_item(item) -> reward_pb2.ScoreItem:
    """A ScoreItem from ``(prompt, response)``, ``{"prompt", "response"}``, a conversation (messages ending
    with the assistant's turn, or ``{"messages": [...]}``) or a ScoreItem."""
    if isinstance(item, reward_pb2.ScoreItem):
        return item
    if isinstance(item, Mapping):
        if "messages" in item:
            return make_item(list(item["messages"]))
        return make_item((item["prompt"], item["response"]))
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str):
        prompt, response = item
        return reward_pb2.ScoreItem(
            pair=reward_pb2.PromptResponse(prompt=make_prompt(prompt), response=response)
        )
    if isinstance(item, (tuple, list)) and all(isinstance(m, Mapping) for m in item):
        return reward_pb2.ScoreItem(conversation=common_pb2.Conversation(messages=make_messages(item)))
    raise TypeError(f"cannot score {type(item).__name__}: expected (prompt, response) or a conversation")


def make_score_request(items, truncation: str | None = None) -> reward_pb2.ScoreRequest:
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {sorted(k for k in TRUNCATION if k)} or None")
    return reward_pb2.ScoreRequest(items=[make_item(i) for i in items], truncation=TRUNCATION[truncation])


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _RewardClientBase:
    """Connection settings shared by the blocking and the asyncio client."""

    _aio = False

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        *,
        tls: bool = False,
        tls_ca_file: str | None = None,
        batch_size: int = 64,
        max_message_mb: int = 64,
    ):
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size
        self.channel = make_channel(
            target,
            token=token,
            tls=tls,
            tls_ca_file=tls_ca_file,
            max_message_mb=max_message_mb,
            aio=self._aio,
        )
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)


class RewardClient(_RewardClientBase):
    """Blocking calls to a RewardService at ``target`` (host:port)."""

    def _call(self, method: str, request):
        fn = getattr(self.stub, method)
        return call_with_retry(
            lambda: fn(request, timeout=self.timeout), self.retry, f"RewardService.{method}"
        )

    def score(self, pairs, *, truncation: str | None = None) -> list[float]:
        """Raw scores of ``(prompt, response)`` pairs, in order (sent ``batch_size`` pairs per request)."""
        scores: list[float] = []
        for chunk in _chunks(list(pairs), self.batch_size):
            scores.extend(r.score for r in self.score_detailed(chunk, truncation=truncation).results)
        return scores

    def score_detailed(self, items, *, truncation: str | None = None) -> reward_pb2.ScoreResponse:
        """One Score request: results with normalized scores and the version of the model that scored them."""
        return self._call("Score", make_score_request(items, truncation))

    def load_model(self, path: str, version: str = "") -> reward_pb2.LoadModelResponse:
        """Hot-swap the server to the checkpoint at ``path`` (a folder the server can read)."""
        return self._call("LoadModel", reward_pb2.LoadModelRequest(path=str(path), version=version))

    def model_info(self) -> common_pb2.ModelInfo:
        return self._call("GetModelInfo", common_pb2.GetModelInfoRequest()).model

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRewardClient(_RewardClientBase):
    """The same calls as :class:`RewardClient`, as coroutines (create it inside the event loop)."""

    _aio = True

    async def _call(self, method: str, request):
        fn = getattr(self.stub, method)
        return await acall_with_retry(
            lambda: fn(request, timeout=self.timeout), self.retry, f"RewardService.{method}"
        )

    async def score(self, pairs, *, truncation: str | None = None) -> list[float]:
        scores: list[float] = []
        for chunk in _chunks(list(pairs), self.batch_size):
            response = await self.score_detailed(chunk, truncation=truncation)
            scores.extend(r.score for r in response.results)
        return scores

    async def score_detailed(self, items, *, truncation: str | None = None) -> reward_pb2.ScoreResponse:
        return await self._call("Score", make_score_request(items, truncation))

    async def load_model(self, path: str, version: str = "") -> reward_pb2.LoadModelResponse:
        return await self._call("LoadModel", reward_pb2.LoadModelRequest(path=str(path), version=version))

    async def model_info(self) -> common_pb2.ModelInfo:
        return (await self._call("GetModelInfo", common_pb2.GetModelInfoRequest())).model

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
