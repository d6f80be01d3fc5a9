"""The PPO learner: one scored rollout in, one PPO update out. No I/O.

One update (``PPOLearner.step``) reads like the algorithm::

    old = first_forward(rollout)          # old logprobs and values, before any optimizer step
    adv = estimate_advantages(...)        # shaped rewards (score - kl_coef * KL) -> GAE or RLOO -> whitened
    for epoch in range(num_ppo_epochs):   # minibatches of clipped PPO steps
        for minibatch in randperm(batch).split(minibatch_size):
            loss = pg_loss + vf_coef * vf_loss; loss.backward(); clip; optimizer.step()
    kl_ctl.update(mean KL per sequence)
    return statistics

The first forward: with one minibatch of one micro-batch it keeps its graph and is reused as the first PPO
forward (the policy has not moved yet). With RLOO (no values) and the service's logprobs usable as old
logprobs it is skipped: nothing needs values, and the statistics it gives (entropy, the logprob mismatch) come
from the first update forward instead, which sees the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from rlhf.rl.forward import ForwardOut, ValueHead, response_forward
from rlhf.rl.math import (
    AdaptiveKLController,
    FixedKLController,
    assert_finite,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)
from rlhf.rl.optim import Schedule, grad_norm, make_scheduler, weight_decay_groups
from rlhf.rl.rollout import Rollout

PhaseTimer = Callable[[str], contextlib.AbstractContextManager]
FirstForwardMode = Literal["fused", "skipped", "separate"]
LOSS_STATS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "ratio", "grad_norm")


class PPOHyperparameters(Protocol):
    """The hyperparameters the learner reads (names as TRL's; rlhf.trainer.config.PPOConfig documents each)."""

    # rollout shape
    micro_batch_size: int  # largest forward/backward batch
    samples_per_prompt: int  # responses per prompt (RLOO's groups)
    temperature: float  # of the sampling, so of the logprobs too
    reuse_generation_logprobs: bool  # the service's logprobs as old logprobs when its weights are ours
    # rewards and advantages
    kl_coef: float
    adaptive_kl: bool
    target_kl: float
    kl_horizon: float
    kl_estimator: Literal["k1", "k3"]
    missing_eos_penalty: float | None
    reward_clip: float | None
    whiten_rewards: bool
    advantage_estimator: Literal["gae", "rloo"]
    gamma: float
    lam: float
    # the update
    num_ppo_epochs: int
    num_mini_batches: int
    cliprange: float
    cliprange_value: float
    vf_coef: float
    max_grad_norm: float
    # optimizer and schedule
    learning_rate: float
    value_learning_rate: float
    weight_decay: float
    adam_betas: tuple[float, float]
    lr_scheduler: Schedule
    warmup_steps: int


def no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class OldPolicy:
    """What the policy says about the rollout before the update; tensors (B, T), 0 outside the mask."""

    logprobs: torch.Tensor  # the trainer's logprobs (the service's when the first forward is skipped)
    values: torch.Tensor
    old_logprobs: torch.Tensor  # the PPO ratio's denominator
    entropy: torch.Tensor | None = None  # 0-d; None until a forward gave it
    mismatch: torch.Tensor | None = None  # |trainer - service| logprob per real token
    graph: ForwardOut | None = None  # the fused first forward, reused (once) as the first PPO forward


@dataclass
class Advantages:
    """The estimate the PPO epochs optimise against; tensors (B, T), 0 outside the mask."""

    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    kl: torch.Tensor  # per-token KL to the reference
    non_score_reward: torch.Tensor  # -kl_coef * kl


def first_forward_mode(cfg: PPOHyperparameters, batch: int, micro: int, reuse: bool) -> FirstForwardMode:
    """'fused' (one minibatch of one micro-batch: keep the graph), 'skipped' (RLOO with the service's
    logprobs), else 'separate' (a no-grad pass in micro-batches)."""
    if cfg.num_mini_batches == 1 and micro >= batch:
        return "fused"
    if reuse and cfg.advantage_estimator == "rloo":
        return "skipped"
    return "separate"


def logprob_mismatch(logprobs: torch.Tensor, gen_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|trainer logprob - generation service logprob| on each real token (1-d)."""
    return (logprobs.detach() - gen_logprobs).abs()[mask]


def estimate_advantages(
    rollout: Rollout,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    kl_coef: float,
    cfg: PPOHyperparameters,
) -> Advantages:
    """Shaped rewards (score on the last token, -kl_coef * KL on every token), GAE or RLOO, whitening.

    logprobs, ref_logprobs, values: (B, T); ``rollout.scores`` (B,) must be set.
    """
    mask = rollout.mask
    rewards, non_score_reward, kl = compute_rewards(
        rollout.scores, logprobs, ref_logprobs, mask, kl_coef, cfg.kl_estimator, **score_shaping(rollout, cfg)
    )
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if cfg.advantage_estimator == "rloo":
        advantages, returns = rloo_advantages(rewards, mask, cfg.samples_per_prompt)
    else:
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return Advantages(masked_whiten(advantages, mask), returns, kl, non_score_reward)


def score_shaping(rollout: Rollout, cfg: PPOHyperparameters) -> dict:
    """compute_rewards' arguments that turn a score into the last token's reward (EOS penalty, clipping)."""
    return {
        "ended_with_eos": rollout.ended_with_eos,
        "missing_eos_penalty": cfg.missing_eos_penalty,
        "reward_clip": cfg.reward_clip,
    }


def shaped_scores(rollout: Rollout, cfg: PPOHyperparameters) -> torch.Tensor:
    """The score part of the shaped rewards (EOS penalty, clipping), per response. (B,)"""
    zeros = torch.zeros_like(rollout.gen_logprobs)
    rewards, _, _ = compute_rewards(
        rollout.scores, zeros, zeros, rollout.mask, 0.0, **score_shaping(rollout, cfg)
    )
    return rewards.sum(-1)


def ppo_loss(
    out: ForwardOut,
    old: OldPolicy,
    adv: Advantages,
    rows: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOHyperparameters,
    vf_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = pg_loss + vf_coef * vf_loss on the micro-batch ``rows``; returns (loss, its statistics)."""
    pg_loss, pg_stats = ppo_policy_loss(
        out.logprobs, old.old_logprobs[rows], adv.advantages[rows], mask[rows], cfg.cliprange
    )
    stats = {
        "policy_loss": float(pg_loss.detach()),
        "clipfrac": float(pg_stats["clipfrac"]),
        "approx_kl": float(pg_stats["approx_kl"]),
        "ratio": float(pg_stats["ratio_mean"]),
    }
    loss = pg_loss
    if vf_coef:
        vf_loss, vf_clipfrac = ppo_value_loss(
            out.values, old.values[rows], adv.returns[rows], mask[rows], cfg.cliprange_value
        )
        loss = loss + vf_coef * vf_loss
        stats["value_loss"] = float(vf_loss.detach())
        stats["vf_clipfrac"] = float(vf_clipfrac)
    return loss, stats


@dataclass
class PPOLearner:
    """The policy, its value head, the optimizer and the KL controller: one rollout in, one PPO update out."""

    policy: nn.Module
    value_head: ValueHead
    cfg: PPOHyperparameters
    total_iterations: int
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    kl_ctl: AdaptiveKLController | FixedKLController = field(init=False)

    def __post_init__(self) -> None:
        groups = [
            *weight_decay_groups(self.policy.parameters(), self.cfg.weight_decay),
            {
                "params": list(self.value_head.parameters()),
                "weight_decay": 0.0,
                "lr": self.cfg.value_learning_rate,
            },
        ]
        # fused: one kernel per parameter group, also on CPU (about 4x faster than foreach on 135M parameters)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        self.optimizer = torch.optim.AdamW(
            groups, lr=self.cfg.learning_rate, betas=tuple(self.cfg.adam_betas), fused=fused
        )
        self.scheduler = make_scheduler(
            self.optimizer, self.total_iterations, self.cfg.lr_scheduler, self.cfg.warmup_steps
        )
        if self.cfg.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(self.cfg.kl_coef, self.cfg.target_kl, self.cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(self.cfg.kl_coef)

    @property
    def vf_coef(self) -> float:
        """With RLOO nothing learns or uses values."""
        return 0.0 if self.cfg.advantage_estimator == "rloo" else self.cfg.vf_coef

    def step(
        self,
        rollout: Rollout,
        ref_logprobs: torch.Tensor,
        policy_version: int,
        phase: PhaseTimer = no_phase,
    ) -> dict[str, float]:
        """Shaped rewards, GAE and the PPO epochs on one rollout; returns the iteration's statistics.

        rollout: scored (``rollout.scores`` set); ref_logprobs: (B, T); policy_version: the version of the
        trainer's weights now (the service's logprobs serve as old logprobs only when the rollout's matches).
        """
        if rollout.scores is None:
            raise ValueError("rollout.scores: score the rollout before the update")
        if not bool(self.value_head.initialized):
            self.value_head.init_to(float(shaped_scores(rollout, self.cfg).mean()))
        micro = min(self.cfg.micro_batch_size, len(rollout) // self.cfg.num_mini_batches)
        reuse = self.cfg.reuse_generation_logprobs and rollout.policy_version == policy_version
        mode = first_forward_mode(self.cfg, len(rollout), micro, reuse)
        with phase("values" if mode == "separate" else "update"):
            old = self.first_forward(rollout, mode, micro, reuse)
            adv = estimate_advantages(
                rollout, old.logprobs, ref_logprobs, old.values, self.kl_ctl.value, self.cfg
            )
        with phase("update"):
            losses = self.ppo_epochs(rollout, old, adv, micro)
        mean_kl = float(adv.kl.sum(-1).mean())
        self.kl_ctl.update(mean_kl, n_steps=len(rollout))
        return self.statistics(rollout, old, adv, losses)

    def _forward(self, rollout: Rollout, rows: torch.Tensor | None) -> ForwardOut:
        return response_forward(self.policy, rollout, rows, self.cfg.temperature, self.value_head)

    def first_forward(self, rollout: Rollout, mode: FirstForwardMode, micro: int, reuse: bool) -> OldPolicy:
        """The policy's logprobs and values on the rollout before any optimizer step (see the module doc)."""
        mask = rollout.mask
        if mode == "skipped":
            logprobs = rollout.gen_logprobs
            old = OldPolicy(logprobs, torch.zeros_like(logprobs), logprobs)
        else:
            old = self._logprobs_and_values(rollout, mode, micro)
            old.mismatch = logprob_mismatch(old.logprobs, rollout.gen_logprobs, mask)
        old.logprobs = old.logprobs.masked_fill(~mask, 0.0)
        old.values = old.values.masked_fill(~mask, 0.0)
        assert_finite("policy logprobs", old.logprobs)
        assert_finite("values", old.values)
        old.old_logprobs = rollout.gen_logprobs if reuse else old.logprobs
        return old

    def _logprobs_and_values(self, rollout: Rollout, mode: FirstForwardMode, micro: int) -> OldPolicy:
        """One forward over the whole rollout ('fused', graph kept) or no-grad micro-batches ('separate')."""
        graph = None
        if mode == "fused":
            graph = self._forward(rollout, None)
            logprobs, values = graph.logprobs.detach(), graph.values.detach()
            logits, entropy_mask = graph.logits.detach(), rollout.mask
        else:
            with torch.no_grad():
                outs = [self._forward(rollout, rows) for rows in torch.arange(len(rollout)).split(micro)]
            logprobs = torch.cat([o.logprobs for o in outs])
            values = torch.cat([o.values for o in outs])
            logits = outs[0].logits  # entropy from the first micro-batch (enough for a statistic)
            entropy_mask = rollout.mask[: logits.shape[0]]
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits, self.cfg.temperature), entropy_mask)
        return OldPolicy(logprobs, values, logprobs, entropy=entropy, graph=graph)

    def ppo_epochs(
        self, rollout: Rollout, old: OldPolicy, adv: Advantages, micro: int
    ) -> dict[str, list[float]]:
        """num_ppo_epochs passes over the rollout in num_mini_batches optimizer steps; the losses' statistics."""
        batch = len(rollout)
        minibatch = batch // self.cfg.num_mini_batches
        stats: dict[str, list[float]] = {k: [] for k in LOSS_STATS}
        for _epoch in range(self.cfg.num_ppo_epochs):
            # the fused first forward saw the rows in order; its epoch keeps that order
            order = torch.arange(batch) if old.graph is not None else torch.randperm(batch)
            for mb_rows in order.split(minibatch):
                self.minibatch_step(rollout, old, adv, mb_rows, micro, stats)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return stats

    def minibatch_step(
        self,
        rollout: Rollout,
        old: OldPolicy,
        adv: Advantages,
        mb_rows: torch.Tensor,
        micro: int,
        stats: dict[str, list[float]],
    ) -> None:
        """One optimizer step on the minibatch ``mb_rows`` (gradients accumulated over micro-batches)."""
        mask = rollout.mask
        self.optimizer.zero_grad(set_to_none=True)
        for rows in mb_rows.split(micro):
            out = old.graph if old.graph is not None else self._forward(rollout, rows)
            old.graph = None
            if old.entropy is None:  # the skipped first forward: this one, before any optimizer step
                with torch.no_grad():
                    old.entropy = masked_mean(
                        entropy_from_logits(out.logits, self.cfg.temperature), mask[rows]
                    )
                old.mismatch = logprob_mismatch(out.logprobs, rollout.gen_logprobs[rows], mask[rows])
            loss, loss_stats = ppo_loss(out, old, adv, rows, mask, self.cfg, self.vf_coef)
            (loss * (len(rows) / len(mb_rows))).backward()
            for key, value in loss_stats.items():
                stats[key].append(value)
            del out
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        stats["grad_norm"].append(float(grad_norm(params, self.cfg.max_grad_norm)))
        self.optimizer.step()

    def statistics(
        self, rollout: Rollout, old: OldPolicy, adv: Advantages, losses: dict[str, list[float]]
    ) -> dict[str, float]:
        """The iteration's metrics: rewards, KL, entropy, lengths, mismatch, losses, value fit."""
        mask, batch = rollout.mask, len(rollout)
        raw = rollout.raw_scores if rollout.raw_scores is not None else rollout.scores
        shaped = float(shaped_scores(rollout, self.cfg).mean())
        non_score = float(adv.non_score_reward.sum(-1).mean())
        mismatch = old.mismatch
        result = {
            "reward_mean": float(raw.mean()),
            "reward_std": float(raw.std()) if batch > 1 else 0.0,
            "score_mean": float(rollout.scores.mean()),
            "shaped_score_mean": shaped,
            "kl": float(adv.kl.sum(-1).mean()),
            "non_score_reward": non_score,
            "rlhf_reward": shaped + non_score,
            "entropy": float(old.entropy),
            "response_length": float(mask.sum(-1).float().mean()),
            "eos_fraction": float(rollout.ended_with_eos.float().mean()),
            "return_mean": float(masked_mean(adv.returns, mask)),
            "logprob_mismatch_max": float(mismatch.max()) if mismatch.numel() else 0.0,
            "logprob_mismatch_mean": float(mismatch.mean()) if mismatch.numel() else 0.0,
            "kl_coef": self.kl_ctl.value,
            "learning_rate": self.scheduler.get_last_lr()[0],
        }
        if self.vf_coef:  # with RLOO nothing learns or uses values: no value statistics to report
            result["explained_variance"] = float(explained_variance(old.values, adv.returns, mask))
            result["value_mean"] = float(masked_mean(old.values, mask))
        for key, values in losses.items():
            if values:
                result[key if key != "ratio" else "ratio_mean"] = sum(values) / len(values)
        result["loss"] = result["policy_loss"] + self.vf_coef * result.get("value_loss", 0.0)
        return result
