"""The forwards of PPO on a rollout: the policy's logprobs and values, the reference's logprobs. No I/O.

The value model is a scalar value head on the policy (a linear layer on the policy's last hidden state, as
TRL's ``AutoModelForCausalLMWithValueHead``): one forward of the policy gives both the logprobs and the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from rlhf.core.models import position_ids_from_mask
from rlhf.rl.math import logprobs_from_logits
from rlhf.rl.rollout import MIN_SHARED_PREFIX, Rollout


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state h_t. (B, L, H) -> (B, L)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # set once the bias has been placed on the reward scale (kept in the state dict for resume)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def init_to(self, value: float) -> None:
        """Values start at ``value`` everywhere: zero weight, bias = value."""
        self.summary.weight.zero_()
        self.summary.bias.fill_(float(value))
        self.initialized.fill_(True)


@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # (b, T)
    values: torch.Tensor | None  # (b, T)
    logits: torch.Tensor  # (b, T, V)


def backbone_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_length: int = 0):
    """Last hidden states (b, L - skip, H) of ``model``'s backbone and ``skip``, the columns not returned.

    When the rows share their first ``prefix_length`` tokens (at least MIN_SHARED_PREFIX), the prefix runs once
    (batch 1) and its keys/values are broadcast to every row: the same result as the full forward (gradients
    included: they flow back through the broadcast into the one prefix pass) for fewer FLOPs.
    """
    positions = position_ids_from_mask(attention_mask)
    base = model.base_model
    if prefix_length < MIN_SHARED_PREFIX:
        out = base(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state, 0
    cache = DynamicCache()
    base(
        input_ids=input_ids[:1, :prefix_length],
        attention_mask=attention_mask[:1, :prefix_length],
        position_ids=positions[:1, :prefix_length],
        past_key_values=cache,
        use_cache=True,
    )
    rows = input_ids.shape[0]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    out = base(
        input_ids=input_ids[:, prefix_length:],
        attention_mask=attention_mask,
        position_ids=positions[:, prefix_length:],
        past_key_values=cache,
        cache_position=torch.arange(prefix_length, input_ids.shape[1], device=input_ids.device),
        use_cache=True,
    )
    return out.last_hidden_state, prefix_length


def response_forward(
    model,
    rollout: Rollout,
    rows: torch.Tensor | None,
    temperature: float,
    value_head: ValueHead | None = None,
) -> ForwardOut:
    """Logprobs of the sampled response tokens under ``model`` at ``temperature`` (and values).

    One pass of the backbone over prompt + response (the shared prompt prefix once for all rows); the LM head
    (and the value head) run only on the T positions that predict response tokens, which skips the vocabulary
    projection of the prompt. rows: indices into the rollout (None = all).
    """
    input_ids = rollout.input_ids if rows is None else rollout.input_ids[rows]
    attention_mask = rollout.attention_mask if rows is None else rollout.attention_mask[rows]
    responses = rollout.responses if rows is None else rollout.responses[rows]
    hidden, skipped = backbone_hidden(model, input_ids, attention_mask, rollout.prefix_length)
    start = rollout.context_length - 1 - skipped
    hidden = hidden[:, start : start + responses.shape[1]]
    logits = model.get_output_embeddings()(hidden)
    logprobs = logprobs_from_logits(logits, responses, temperature)
    values = value_head(hidden) if value_head is not None else None
    return ForwardOut(logprobs, values, logits)


@torch.no_grad()
def reference_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """(B, T) logprobs of the responses under the frozen reference model."""
    rows = torch.arange(len(rollout))
    out = [
        response_forward(model, rollout, chunk, temperature).logprobs
        for chunk in rows.split(micro_batch_size)
    ]
    return torch.cat(out).masked_fill(~rollout.mask, 0.0)
