"""A rollout as tensors: prompts left-padded, responses right-padded, in one batch. No I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf.core.models import common_prefix_length

Prompt = str | list[dict]
MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth a forward pass of its own


@dataclass
class Rollout:
    """One rollout as tensors. B responses; P = longest prompt, T = longest response.

    input_ids / attention_mask: (B, P + T), each prompt left-padded to P and each response right-padded to T,
    so response token t of every row sits at column P + t and is predicted by the logits at column P + t - 1.
    The first ``prefix_length`` columns hold the prompts' common prefix (the padding comes after it).
    """

    prompts: list[Prompt]  # (B,) the prompt of each response, as sent to the reward service
    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    responses: torch.Tensor  # (B, T), pad after the end
    mask: torch.Tensor  # (B, T) bool, true on real response tokens (EOS included)
    gen_logprobs: torch.Tensor  # (B, T) the generation service's logprobs, 0 outside the mask
    ended_with_eos: torch.Tensor  # (B,) bool
    texts: list[str]  # (B,) decoded responses
    policy_version: int
    scores: torch.Tensor | None = None  # (B,) the scores the rewards are shaped from
    raw_scores: torch.Tensor | None = None  # (B,) the reward service's raw scores
    prefix_length: int = 0  # leading columns that hold the same tokens in every row (see build_rollout)

    def __len__(self) -> int:
        return self.responses.shape[0]

    @property
    def context_length(self) -> int:
        return self.input_ids.shape[1] - self.responses.shape[1]


def build_rollout(
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    gen_logprobs: Sequence[Sequence[float]],
    ended_with_eos: Sequence[bool],
    texts: Sequence[str],
    *,
    pad_token_id: int,
    policy_version: int,
    share_prefix: bool = True,
) -> Rollout:
    """Pack prompts (left-padded) and responses (right-padded) into one batch; see :class:`Rollout`.

    With ``share_prefix`` the tokens every prompt starts with (e.g. a chat template's default system prompt)
    stay in the first columns and the padding goes after them, so a forward can run that prefix once for the
    whole batch (``Rollout.prefix_length``); every row keeps at least one prompt token of its own.
    """
    if not response_ids:
        raise ValueError("a rollout needs at least one response")
    if any(len(r) == 0 for r in response_ids):
        raise ValueError("every response needs at least one token")
    batch = len(response_ids)
    width_p = max(len(p) for p in prompt_ids)
    width_t = max(len(r) for r in response_ids)
    prefix = 0
    if share_prefix:
        prefix = common_prefix_length(prompt_ids, own=1)
    input_ids = torch.full((batch, width_p + width_t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width_p + width_t), dtype=torch.long)
    logprobs = torch.zeros((batch, width_t), dtype=torch.float32)
    for row, (p, r, lp) in enumerate(zip(prompt_ids, response_ids, gen_logprobs, strict=True)):
        if len(lp) != len(r):
            raise ValueError(f"samples[{row}]: {len(lp)} logprobs for {len(r)} tokens")
        p = list(p)
        input_ids[row, :prefix] = torch.tensor(p[:prefix], dtype=torch.long)
        attention_mask[row, :prefix] = 1
        rest = p[prefix:]
        input_ids[row, width_p - len(rest) : width_p] = torch.tensor(rest, dtype=torch.long)
        input_ids[row, width_p : width_p + len(r)] = torch.tensor(list(r), dtype=torch.long)
        attention_mask[row, width_p - len(rest) : width_p + len(r)] = 1
        logprobs[row, : len(r)] = torch.tensor(list(lp), dtype=torch.float32)
    responses = input_ids[:, width_p:].clone()
    mask = attention_mask[:, width_p:].bool()
    return Rollout(
        prompts=list(prompts),
        input_ids=input_ids,
        attention_mask=attention_mask,
        responses=responses,
        mask=mask,
        gen_logprobs=logprobs,
        ended_with_eos=torch.tensor(list(ended_with_eos), dtype=torch.bool),
        texts=list(texts),
        policy_version=policy_version,
        prefix_length=prefix,
    )
