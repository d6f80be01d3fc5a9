"""Rollouts through the services: sample from the generation service, score with the reward service.

Service faults: every call has a deadline (``service_timeout``) and is retried with backoff on UNAVAILABLE /
RESOURCE_EXHAUSTED for ``service_retry_seconds`` (rlhf.core.client). A generation service that restarted (and
so serves its initial weights at version 0) is detected from ``min_policy_version`` and gets the current
weights pushed again. A call that still fails with UNAVAILABLE / DEADLINE_EXCEEDED after the retry window
becomes :class:`rlhf.core.errors.ServiceDown` (see :func:`calling`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import grpc
import torch
from torch import nn

from rlhf.core.client import RetryPolicy
from rlhf.core.errors import ServiceDown
from rlhf.generation.client import PolicyClient
from rlhf.reward.client import RewardClient
from rlhf.rl.learner import PhaseTimer, no_phase
from rlhf.rl.math import assert_finite
from rlhf.rl.rollout import Prompt, Rollout, build_rollout
from rlhf.trainer.config import PPOConfig
from rlhf.trainer.weight_sync import PolicySync, is_code
from rlhf.v1 import common_pb2

log = logging.getLogger("rlhf.trainer.rollouts")


def generate_rollout(
    client,
    sync: PolicySync,
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[list[int]],
    cfg: PPOConfig,
    seed: int | None = None,
    phase: PhaseTimer = no_phase,
    attempts: int = 3,
) -> Rollout:
    """Sample ``samples_per_prompt`` responses per prompt from the service at the trainer's version."""
    for attempt in range(attempts):
        with phase("sync"):
            sync.push(model)
        try:
            with phase("generate"):
                per_request = max(1, sync.max_batch_size // cfg.samples_per_prompt)
                samples = []
                for start in range(0, len(prompt_ids), per_request):
                    samples += client.generate(
                        [list(ids) for ids in prompt_ids[start : start + per_request]],
                        max_new_tokens=cfg.response_length,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        seed=seed,
                        n=cfg.samples_per_prompt,
                        logprobs_mode="temperature",
                        min_policy_version=sync.version,
                        return_prompt_token_ids=False,
                    )
        except grpc.RpcError as exc:
            if not is_code(exc, grpc.StatusCode.FAILED_PRECONDITION) or attempt == attempts - 1:
                raise
            log.warning(
                "generation service is behind version %d (%s): pushing again", sync.version, exc.details()
            )
            sync.served = None
            continue
        stale = sorted({s.policy_version for s in samples if s.policy_version != sync.version})
        if not stale:
            break
        log.warning("refusing samples of policy version(s) %s (trainer is at %d)", stale, sync.version)
        sync.served = None
    else:
        raise RuntimeError(
            f"the generation service keeps answering with policy version(s) {stale}, not {sync.version}: "
            "is another trainer pushing weights to it?"
        )
    n = cfg.samples_per_prompt
    if len(samples) != len(prompts) * n:
        raise RuntimeError(f"generation service returned {len(samples)} samples for {len(prompts)} x {n}")
    eos = tokenizer.eos_token_id
    return build_rollout(
        [prompts[i // n] for i in range(len(samples))],
        [prompt_ids[i // n] for i in range(len(samples))],
        [list(s.token_ids) for s in samples],
        [list(s.logprobs) for s in samples],
        [
            s.finish_reason == common_pb2.FINISH_REASON_STOP
            or (len(s.token_ids) > 0 and s.token_ids[-1] == eos)
            for s in samples
        ],
        [s.text for s in samples],
        pad_token_id=tokenizer.pad_token_id,
        policy_version=sync.version,
    )


def score_rollout(client, rollout: Rollout, normalize: bool, batch_size: int = 64) -> None:
    """Scores from the reward service into ``rollout.scores`` (normalized when asked and available)."""
    raw, used = [], []
    items = list(zip(rollout.prompts, rollout.texts, strict=True))
    for start in range(0, len(items), batch_size):
        response = client.score_detailed(items[start : start + batch_size])
        for result in response.results:
            raw.append(result.score)
            use_normalized = normalize and result.HasField("normalized_score")
            used.append(result.normalized_score if use_normalized else result.score)
    rollout.raw_scores = torch.tensor(raw, dtype=torch.float32)
    rollout.scores = torch.tensor(used, dtype=torch.float32)
    assert_finite("reward scores", rollout.scores)


def _retry_policy(cfg: PPOConfig) -> RetryPolicy:
    return RetryPolicy(retry_timeout=cfg.service_retry_seconds)


def make_clients(cfg: PPOConfig) -> tuple[PolicyClient, RewardClient]:
    """The generation and reward clients (balanced over every replica), with the job's deadline and retries."""
    return make_policy_client(cfg, cfg.generation_target), RewardClient(
        cfg.reward_target, token=cfg.reward_token, timeout=cfg.service_timeout, retry=_retry_policy(cfg)
    )


def make_policy_client(cfg: PPOConfig, target: str) -> PolicyClient:
    """A generation client for ``target``: the balanced one, or one replica's (for weight pushes)."""
    return PolicyClient(
        target, token=cfg.generation_token, timeout=cfg.service_timeout, retry=_retry_policy(cfg)
    )


@contextlib.contextmanager
def calling(service: str, target: str) -> Iterator[None]:
    """Turn a call's final UNAVAILABLE / DEADLINE_EXCEEDED (retries exhausted) into ServiceDown."""
    try:
        yield
    except grpc.RpcError as exc:
        if is_code(exc, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            message = f"{service} service at {target}: {exc.code().name}: {exc.details()}"
            raise ServiceDown(message, service=service) from exc
        raise
