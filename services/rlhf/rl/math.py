"""The RL math of PPO for language models: pure functions on tensors, no I/O.

Names follow the papers, CleanRL and TRL (`kl_coef`, `cliprange`, `cliprange_value`, `gamma`, `lam`).
Shapes: B = batch (responses), T = response length (right-padded), V = vocabulary.
A `mask` is (B, T), bool or 0/1, true on real response tokens (the EOS token included).

The order of one PPO rollout, as the trainer uses these functions:

    responses = truncate_response_after_eos(responses, eos_token_id, pad_token_id)
    mask = response_mask_from_lengths(response_lengths(responses, eos_token_id), T)
    logprobs = logprobs_from_logits(policy_logits, responses, temperature)      # (B, T)
    ref_logprobs = logprobs_from_logits(ref_logits, responses, temperature)     # (B, T)
    rewards, non_score_reward, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, ...)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    advantages = masked_whiten(advantages, mask)
    # for each PPO epoch and minibatch:
    pg_loss, pg_stats = ppo_policy_loss(new_logprobs, logprobs, advantages, mask, cliprange)
    vf_loss, vf_clipfrac = ppo_value_loss(new_values, values, returns, mask, cliprange_value)
    loss = pg_loss + vf_coef * vf_loss
    kl_ctl.update(mean_kl_per_sequence, n_steps=batch_size)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k3", "abs", "mse"]


# ---------------------------------------------------------------------------------------------------------
# log-probabilities and entropy


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at `index`, one batch row at a time.

    logits: (B, T, V); index: (B, T) long -> (B, T). Never materialises a full (B, T, V) log-softmax,
    only one (T, V) row (as TRL's `selective_log_softmax`), which matters for a 49k-token vocabulary.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        if temperature != 1.0:
            row_logits = row_logits / temperature
        if row_logits.dtype in (torch.float32, torch.float64):
            selected = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
            rows.append(selected - torch.logsumexp(row_logits, dim=-1))
        else:  # half precision: logsumexp loses too much; take the log-softmax in float32
            row_logps = F.log_softmax(row_logits.float(), dim=-1)
            rows.append(row_logps.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probability of `tokens` under softmax(logits / temperature).

    logits: (B, T, V), already aligned so that logits[:, t] predicts tokens[:, t]; tokens: (B, T) -> (B, T).
    Use the sampling temperature so that the logprobs are those of the distribution that was sampled.
    """
    return selective_log_softmax(logits, tokens, temperature)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 128
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position. logits: (B, T, V) -> (B, T).

    Computed `chunk_size` positions at a time to keep the peak memory of the softmax small.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk.float() / temperature, dim=-1)
        entropies.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(entropies).reshape(logits.shape[:-1]).to(logits.dtype)


# ---------------------------------------------------------------------------------------------------------
# masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true, over all entries or along `dim`.

    Entries outside the mask are ignored even when they are nan or inf. An empty mask gives 0.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values))
    count = mask.sum() if dim is None else mask.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is true (0-d); `unbiased` applies Bessel's correction n / (n - 1)."""
    mask = mask.bool()
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = int(mask.sum())
        if n < 2:
            raise ValueError(f"unbiased variance needs at least 2 unmasked entries, got {n}")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries; with shift_mean=False the mean is added back.

    values, mask: (B, T) -> (B, T). Statistics use only masked-in entries (unbiased variance, as TRL);
    masked-out entries come out as 0.
    """
    mask = mask.bool()
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked entries (0-d); nan when Var[returns] is 0.

    1 is a perfect value function, 0 one no better than a constant, negative one worse than a constant.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(float("nan"))
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ---------------------------------------------------------------------------------------------------------
# responses: EOS handling and masks


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first true entry along the last dim, or its length when there is none. (B, T) -> (B,)."""
    row_len = bools.shape[-1]
    positions = torch.arange(row_len, device=bools.device)
    return torch.where(bools.bool(), positions, row_len).min(dim=-1).values


def truncate_response_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> torch.Tensor:
    """Keep each response up to and including its first EOS; every later token becomes pad. (B, T) -> (B, T)."""
    first_eos = first_true_indices(responses == eos_token_id).unsqueeze(-1)
    positions = torch.arange(responses.shape[-1], device=responses.device)
    return responses.masked_fill(positions > first_eos, pad_token_id)


def response_lengths(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Number of real tokens of each response: up to and including its first EOS, else all T. (B, T) -> (B,)."""
    return (first_true_indices(responses == eos_token_id) + 1).clamp(max=responses.shape[-1])


def response_mask_from_lengths(lengths: torch.Tensor, response_length: int) -> torch.Tensor:
    """Bool mask (B, response_length), true on the first lengths[b] positions of row b. lengths: (B,)."""
    positions = torch.arange(response_length, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(-1)


def last_token_indices(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true entry of each row of a (B, T) mask -> (B,). Raises if a row has none."""
    mask = mask.bool()
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("every response needs at least one real token (a row of the mask is all false)")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, positions, -1).max(dim=-1).values


# ---------------------------------------------------------------------------------------------------------
# KL penalty and shaped rewards


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log p_ref per token: unbiased for KL(p || p_ref) under samples from p, can be negative."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = p_ref / p per token: unbiased, never negative, low variance (Schulman 2020)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, as TRL's `kl_penalty`. (B, T) -> (B, T).

    kind: "k1" (log-ratio), "k3" ((r - 1) - log r), "abs" (|log-ratio|), "mse" (0.5 * log-ratio^2).
    """
    if kind == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if kind == "k3":
        return kl_k3(logprobs, ref_logprobs)
    if kind == "abs":
        return (logprobs - ref_logprobs).abs()
    if kind == "mse":
        return 0.5 * (logprobs - ref_logprobs).square()
    raise ValueError(f"kind must be one of 'k1', 'k3', 'abs', 'mse', got {kind!r}")


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: KLEstimator = "k1",
    ended_with_eos: torch.Tensor | None = None,
    missing_eos_penalty: float | None = None,
    score_mean: float | None = None,
    score_std: float | None = None,
    reward_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token shaped rewards: -kl_coef * KL at every response token, plus the score on the last one.

    scores: (B,) reward-model scores; logprobs, ref_logprobs, mask: (B, T); ended_with_eos: (B,) bool.
    The score is transformed in this order: normalised as (score - score_mean) / score_std when given,
    lowered by `missing_eos_penalty` (a positive number, as TRL) where `ended_with_eos` is false,
    clipped to [-reward_clip, reward_clip] when given.
    Returns (rewards, non_score_reward, kl), each (B, T) and 0 outside the mask.
    """
    mask = mask.bool()
    scores = scores.to(logprobs.dtype)
    if score_mean is not None or score_std is not None:
        scores = (scores - (score_mean or 0.0)) / (score_std if score_std is not None else 1.0)
    if missing_eos_penalty is not None:
        if ended_with_eos is None:
            raise ValueError("missing_eos_penalty needs ended_with_eos")
        scores = torch.where(ended_with_eos.bool(), scores, scores - missing_eos_penalty)
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)

    zeros = torch.zeros_like(logprobs)
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, kind), zeros)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_indices(mask)] += scores
    return rewards, non_score_reward, kl


# ---------------------------------------------------------------------------------------------------------
# advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), a backwards loop as in CleanRL.

    rewards, values, mask: (B, T) -> (advantages, returns), each (B, T) and 0 outside the mask.
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t
    The episode ends at the last real token (V after it is 0). Masked-out positions contribute nothing:
    they are skipped, so t+1 means the next real position.
    """
    mask = mask.bool()
    advantages = torch.zeros_like(values)
    next_values = torch.zeros_like(values[:, 0])
    lastgaelam = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        gae = delta + gamma * lam * lastgaelam
        real = mask[:, t]
        advantages[:, t] = torch.where(real, gae, 0.0)
        lastgaelam = torch.where(real, gae, lastgaelam)
        next_values = torch.where(real, values[:, t], next_values)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def rloo_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, TRL's RLOO): the baseline of a
    response is the mean return of the other responses to the same prompt, so no value function is needed.

    rewards, mask: (B, T) shaped per-token rewards, rows grouped by prompt (``group_size`` consecutive rows per
    prompt). Returns (advantages, returns), each (B, T): every real token of response i gets
    A_i = R_i - mean_{j != i in its group} R_j with R_i = sum_t rewards[i, t]; returns hold R_i (0 outside).
    """
    if group_size < 2:
        raise ValueError("rloo_advantages: group_size must be at least 2 (a leave-one-out baseline)")
    batch = rewards.shape[0]
    if batch % group_size:
        raise ValueError(f"rloo_advantages: {batch} rows are not groups of {group_size}")
    mask = mask.bool()
    totals = torch.where(mask, rewards, 0.0).sum(-1).view(-1, group_size)
    baseline = (totals.sum(-1, keepdim=True) - totals) / (group_size - 1)
    per_sequence = (totals - baseline).reshape(batch, 1)
    advantages = torch.where(mask, per_sequence.expand_as(rewards), 0.0)
    returns = torch.where(mask, totals.reshape(batch, 1).expand_as(rewards), 0.0)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# losses


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective of PPO (Schulman et al. 2017), as a loss to minimise.

    logprobs (with grad), old_logprobs, advantages, mask: (B, T). Returns (loss, stats); loss is 0-d,
    stats holds detached 0-d tensors: `clipfrac` (share of tokens where the clipped term is taken),
    `approx_kl` (0.5 * mean log-ratio^2, as TRL), `approx_kl_k3` (mean (r - 1) - log r, as CleanRL),
    `ratio_mean`.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
            "approx_kl": 0.5 * masked_mean(logratio**2, mask),
            "approx_kl_k3": masked_mean((ratio - 1) - logratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)).

    values (with grad), old_values, returns, mask: (B, T). Returns (loss, vf_clipfrac), both 0-d;
    vf_clipfrac (detached) is the share of tokens where the clipped term is the larger one.
    """
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_loss1 = (values - returns).square()
    vf_loss2 = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    vf_clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask).detach()
    return loss, vf_clipfrac


# ---------------------------------------------------------------------------------------------------------
# KL coefficient controllers


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".

    value <- value * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Move the coefficient after `n_steps` samples whose mean KL (per sequence) was `current_kl`."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant KL coefficient with the interface of AdaptiveKLController."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Leave the coefficient unchanged."""
        return self.value


def assert_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError naming `name` when `tensor` holds nan or inf (cheap guard for the trainer loop)."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds non-finite values")


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "assert_finite",
    "compute_gae",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "first_true_indices",
    "kl_k1",
    "kl_k3",
    "kl_penalty",
    "last_token_indices",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_lengths",
    "response_mask_from_lengths",
    "selective_log_softmax",
    "truncate_response_after_eos",
]
