"""`rlhf train ppo`: PPO from the SFT model, with the generation and reward services in the loop.

    run_ppo(cfg: PPOConfig) -> Path   # RUN_DIR/final, an HF folder the generation service loads

Models. The policy and the frozen reference both start from ``cfg.model`` (the SFT checkpoint; the reference
may be another folder, ``cfg.reference_model``). The value model is a **scalar value head on the policy**
(a linear layer on the policy's last hidden state, as TRL's ``AutoModelForCausalLMWithValueHead``): one
forward of the policy gives both the logprobs and the values, so no third 135M-parameter model is kept,
run or trained. Its weight starts at zero and its bias at the mean score of the first rollout, so the values
start on the reward's scale and the value loss does not pull on the shared backbone before the head has
learned anything.

One iteration (the loop of ``run_ppo`` reads like the algorithm)::

    sync       push the current weights to the generation service when it does not serve them yet
    generate   PolicyClient.generate(prompt token ids, temperature, max_new_tokens, logprobs_mode=temperature,
               min_policy_version=v); samples of any other version are refused
    score      RewardClient.score_detailed(prompt, response text) -> scores (normalized when the reward
               checkpoint carries its mean/std)
    reference  one forward of the frozen reference -> reference logprobs
    values     one forward of the policy -> logprobs (compared with the service's: the mismatch is a metric)
               and values. With one minibatch per epoch this forward *is* the first PPO forward (the policy
               has not moved yet), so it runs with gradients inside ``update`` and is not repeated. With RLOO
               and the service's logprobs reusable it is skipped: nothing needs values, the service's logprobs
               serve for the ratio and the KL, and entropy/mismatch are read off the first update forward.
    update     shaped rewards (score on the last token, -kl_coef * KL against the reference on every token,
               a penalty when no EOS) -> GAE -> whitened advantages -> num_ppo_epochs x num_mini_batches
               clipped PPO steps (policy + vf_coef * value loss, gradient clipping) -> adaptive KL coefficient
    then the job shell logs the metrics and checkpoints when due; the weights the update produced are pushed at
    the start of the next iteration (and once after the last one), so every checkpoint and every failure falls
    on a step boundary where the tracked state is consistent.

The old logprobs of the PPO ratio are the generation service's own logprobs when the samples came from the
trainer's current version (``reuse_generation_logprobs``), else the trainer's recompute.

Weight pushes go through a file: the policy's tensors are written as one safetensors file under
``cfg.push_dir`` (``/dev/shm`` by default, memory on one host) and the service reads it from the path; with
``push_dir: ''`` the bytes are streamed over gRPC instead (another host).

Service faults: every call has a deadline (``service_timeout``) and is retried with backoff on UNAVAILABLE /
RESOURCE_EXHAUSTED for ``service_retry_seconds`` (rlhf.core.client). A generation service that restarted
(and so serves its initial weights at version 0) is detected from ``min_policy_version`` and gets the
current weights pushed again. A service that stays down past the retry window ends the job with a clear
message after a checkpoint; ``--resume`` continues from it and pushes the resumed weights first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from torch import nn

from rlhf.core import chat
from rlhf.core.client import RetryPolicy, call_with_retry
from rlhf.core.errors import Unavailable
from rlhf.core.models import (
    common_prefix_length,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
    set_torch_threads,
)
from rlhf.trainer.config import PPOConfig
from rlhf.trainer.data import MIN_SHARED_PREFIX
from rlhf.trainer.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    assert_finite,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)

log = logging.getLogger("rlhf.trainer.ppo")

Prompt = str | list[dict]
PhaseTimer = Callable[[str], contextlib.AbstractContextManager]


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class ServiceDown(Unavailable):
    """A service stayed unavailable past the retry window; the job checkpoints and ends with this message
    (the CLI prints it on one line)."""


# ---------------------------------------------------------------------------------------------------------
# the value head


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


# ---------------------------------------------------------------------------------------------------------
# rollouts as tensors


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


# ---------------------------------------------------------------------------------------------------------
# forwards


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
    from transformers import DynamicCache

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


# ---------------------------------------------------------------------------------------------------------
# the PPO update


@dataclass
class PPOLearner:
    """The policy, its value head, the optimizer and the KL controller: one rollout in, one PPO update out."""

    policy: nn.Module
    value_head: ValueHead
    cfg: PPOConfig
    total_iterations: int
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    kl_ctl: AdaptiveKLController | FixedKLController = field(init=False)

    def __post_init__(self) -> None:
        from rlhf.trainer.loop import make_scheduler

        params = [p for p in self.policy.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
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
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.total_iterations)
        if self.cfg.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(self.cfg.kl_coef, self.cfg.target_kl, self.cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(self.cfg.kl_coef)

    def _shaped_scores(self, rollout: Rollout) -> torch.Tensor:
        """The score part of the shaped rewards (EOS penalty, clipping), per response. (B,)"""
        zeros = torch.zeros_like(rollout.gen_logprobs)
        rewards, _, _ = compute_rewards(
            rollout.scores, zeros, zeros, rollout.mask, 0.0, **self._score_kwargs(rollout)
        )
        return rewards.sum(-1)

    def _score_kwargs(self, rollout: Rollout) -> dict:
        return {
            "ended_with_eos": rollout.ended_with_eos,
            "missing_eos_penalty": self.cfg.missing_eos_penalty,
            "reward_clip": self.cfg.reward_clip,
        }

    def _forward(self, rollout: Rollout, rows: torch.Tensor | None) -> ForwardOut:
        return response_forward(self.policy, rollout, rows, self.cfg.temperature, self.value_head)

    def step(
        self,
        rollout: Rollout,
        ref_logprobs: torch.Tensor,
        policy_version: int,
        phase: PhaseTimer = _no_phase,
    ) -> dict[str, float]:
        """Shaped rewards, GAE and the PPO epochs on one rollout; returns the iteration's statistics.

        rollout: scored (``rollout.scores`` set); ref_logprobs: (B, T); policy_version: the version of the
        trainer's weights now (the service's logprobs serve as old logprobs only when the rollout's matches).
        """
        cfg = self.cfg
        batch = len(rollout)
        mask = rollout.mask
        minibatch = batch // cfg.num_mini_batches
        micro = min(cfg.micro_batch_size, minibatch)
        if rollout.scores is None:
            raise ValueError("rollout.scores: score the rollout before the update")
        if not bool(self.value_head.initialized):
            self.value_head.init_to(float(self._shaped_scores(rollout).mean()))

        # The first forward: values and the trainer's logprobs. With one minibatch of one micro-batch it keeps
        # its graph and is reused as the first PPO forward (the policy has not changed yet). With RLOO (no
        # values) and the service's logprobs usable as old logprobs it is not needed at all: the statistics it
        # gave (entropy, the logprob mismatch) come from the first minibatch's forwards instead, which see the
        # same weights.
        fused = cfg.num_mini_batches == 1 and micro >= batch
        same_version = rollout.policy_version == policy_version
        reuse = cfg.reuse_generation_logprobs and same_version
        skip_first = not fused and reuse and cfg.advantage_estimator == "rloo"
        first: ForwardOut | None = None
        entropy: torch.Tensor | None = None
        mismatch: torch.Tensor | None = None
        with phase("update" if fused or skip_first else "values"):
            if skip_first:
                logprobs = rollout.gen_logprobs
                values = torch.zeros_like(logprobs)
            elif fused:
                first = self._forward(rollout, None)
                logprobs, values, logits = (
                    first.logprobs.detach(),
                    first.values.detach(),
                    first.logits.detach(),
                )
            else:
                with torch.no_grad():
                    outs = [self._forward(rollout, rows) for rows in torch.arange(batch).split(micro)]
                logprobs = torch.cat([o.logprobs for o in outs])
                values = torch.cat([o.values for o in outs])
                logits = outs[0].logits  # entropy from the first micro-batch (enough for a statistic)
                entropy_mask = mask[: logits.shape[0]]
            if not skip_first:
                with torch.no_grad():
                    entropy = masked_mean(
                        entropy_from_logits(logits, cfg.temperature),
                        mask if fused else entropy_mask,
                    )
                del logits
                mismatch = (logprobs - rollout.gen_logprobs).abs()[mask]
            logprobs = logprobs.masked_fill(~mask, 0.0)
            values = values.masked_fill(~mask, 0.0)
            assert_finite("policy logprobs", logprobs)
            assert_finite("values", values)
            old_logprobs = rollout.gen_logprobs if reuse else logprobs

            rewards, non_score_reward, kl = compute_rewards(
                rollout.scores,
                logprobs,
                ref_logprobs,
                mask,
                self.kl_ctl.value,
                cfg.kl_estimator,
                **self._score_kwargs(rollout),
            )
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            if cfg.advantage_estimator == "rloo":
                advantages, returns = rloo_advantages(rewards, mask, cfg.samples_per_prompt)
            else:
                advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask)
            vf_coef = 0.0 if cfg.advantage_estimator == "rloo" else cfg.vf_coef

        stats: dict[str, list[float]] = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "clipfrac",
                "approx_kl",
                "vf_clipfrac",
                "ratio",
                "grad_norm",
            )
        }
        with phase("update"):
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            for _epoch in range(cfg.num_ppo_epochs):
                order = torch.arange(batch) if first is not None else torch.randperm(batch)
                for mb_rows in order.split(minibatch):
                    self.optimizer.zero_grad(set_to_none=True)
                    for rows in mb_rows.split(micro):
                        out = first if first is not None else self._forward(rollout, rows)
                        first = None
                        if entropy is None:
                            # skip_first: the first update forward, before any optimizer step
                            with torch.no_grad():
                                entropy = masked_mean(
                                    entropy_from_logits(out.logits, cfg.temperature), mask[rows]
                                )
                            mismatch = (out.logprobs.detach() - rollout.gen_logprobs[rows]).abs()[mask[rows]]
                        pg_loss, pg_stats = ppo_policy_loss(
                            out.logprobs, old_logprobs[rows], advantages[rows], mask[rows], cfg.cliprange
                        )
                        loss = pg_loss
                        if vf_coef:
                            vf_loss, vf_clipfrac = ppo_value_loss(
                                out.values, values[rows], returns[rows], mask[rows], cfg.cliprange_value
                            )
                            loss = loss + vf_coef * vf_loss
                            stats["value_loss"].append(float(vf_loss.detach()))
                            stats["vf_clipfrac"].append(float(vf_clipfrac))
                        (loss * (len(rows) / len(mb_rows))).backward()
                        stats["policy_loss"].append(float(pg_loss.detach()))
                        stats["clipfrac"].append(float(pg_stats["clipfrac"]))
                        stats["approx_kl"].append(float(pg_stats["approx_kl"]))
                        stats["ratio"].append(float(pg_stats["ratio_mean"]))
                        del out
                    if cfg.max_grad_norm > 0:
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    else:
                        norm = torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in params if p.grad is not None])
                        )
                    stats["grad_norm"].append(float(norm))
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()

        kl_per_sequence = kl.sum(-1)
        mean_kl = float(kl_per_sequence.mean())
        self.kl_ctl.update(mean_kl, n_steps=batch)
        raw = rollout.raw_scores if rollout.raw_scores is not None else rollout.scores
        lengths = mask.sum(-1).float()
        result = {
            "reward_mean": float(raw.mean()),
            "reward_std": float(raw.std()) if batch > 1 else 0.0,
            "score_mean": float(rollout.scores.mean()),
            "shaped_score_mean": float(self._shaped_scores(rollout).mean()),
            "kl": mean_kl,
            "non_score_reward": float(non_score_reward.sum(-1).mean()),
            "rlhf_reward": float(self._shaped_scores(rollout).mean())
            + float(non_score_reward.sum(-1).mean()),
            "entropy": float(entropy),
            "response_length": float(lengths.mean()),
            "eos_fraction": float(rollout.ended_with_eos.float().mean()),
            "return_mean": float(masked_mean(returns, mask)),
            "logprob_mismatch_max": float(mismatch.max()) if mismatch.numel() else 0.0,
            "logprob_mismatch_mean": float(mismatch.mean()) if mismatch.numel() else 0.0,
            "kl_coef": self.kl_ctl.value,
            "learning_rate": self.scheduler.get_last_lr()[0],
        }
        if vf_coef:  # with RLOO nothing learns or uses values: no value statistics to report
            result["explained_variance"] = float(explained_variance(values, returns, mask))
            result["value_mean"] = float(masked_mean(values, mask))
        for key, values_list in stats.items():
            if values_list:
                result[key if key != "ratio" else "ratio_mean"] = sum(values_list) / len(values_list)
        result["loss"] = result["policy_loss"] + vf_coef * result.get("value_loss", 0.0)
        return result


# ---------------------------------------------------------------------------------------------------------
# talking to the services


def policy_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied duplicates dropped (as save_pretrained), contiguous for safetensors."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous()
    return state


class PolicySync:
    """Keeps the generation service serving the trainer's weights, with versions that only move forward."""

    def __init__(self, client, push_dir: str, run_name: str):
        self.client = client
        self.push_dir = Path(push_dir) / f"rlhf-ppo-{run_name}-{os.getpid()}" if push_dir else None
        self.version = 0  # version of the trainer's current weights
        self.served: int | None = None  # version the service serves for us (None = unknown / must push)
        self._pushed_files: list[Path] = []
        self.max_batch_size = 1 << 30  # most sequences per Generate request (from the service's ModelInfo)

    def service_version(self) -> int:
        info = self.client.model_info()
        self.max_batch_size = int(info.max_batch_size) or self.max_batch_size
        return int(info.version or 0)

    def push(self, model: nn.Module, attempts: int = 3) -> int:
        """Push the current weights unless the service already serves them; returns the served version.

        Versions only move forward: when the service serves a version >= ours (a resumed run, or another pusher
        got there first, between our read and our push) the weights go out under the next free number."""
        current = self.service_version()
        if self.served == self.version and current == self.version:
            return self.version
        state = policy_state_dict(model)
        for attempt in range(attempts):
            if current >= self.version:  # e.g. resumed after the killed run had pushed further: renumber
                self.version = current + 1
            try:
                served = self._send(state)
                break
            except grpc.RpcError as exc:
                if not _is_code(exc, grpc.StatusCode.FAILED_PRECONDITION) or attempt == attempts - 1:
                    raise
                current = self.service_version()
                if current < self.version:  # refused for another reason (e.g. a backend without updates)
                    raise
                log.warning(
                    "generation service moved to version %d while version %d was on its way: pushing as %d",
                    current,
                    self.version,
                    current + 1,
                )
        if int(served) != self.version:
            raise RuntimeError(f"generation service serves version {served} after pushing {self.version}")
        self.served = self.version
        return self.version

    def _send(self, state: dict) -> int:
        """One UpdateWeights of ``state`` as ``self.version`` (by file path when push_dir is set)."""
        source: dict = {"state_dict": state}
        if self.push_dir is not None:
            from safetensors.torch import save_file

            self.push_dir.mkdir(parents=True, exist_ok=True)
            path = self.push_dir / f"policy-v{self.version}.safetensors"
            tmp = path.with_name(path.name + ".tmp")
            save_file(state, str(tmp))
            tmp.replace(path)
            self._pushed_files.append(path)
            source = {"checkpoint_path": str(path)}
        served = call_with_retry(
            lambda: self.client.update_weights(version=self.version, **source),
            self.client.retry,
            "PolicyService.UpdateWeights",
        )
        if self.push_dir is not None:
            for old in self._pushed_files[:-1]:  # keep the newest file: a restarted service may need it
                old.unlink(missing_ok=True)
            self._pushed_files = self._pushed_files[-1:]
        return served

    def close(self) -> None:
        if self.push_dir is not None:
            shutil.rmtree(self.push_dir, ignore_errors=True)


def _is_code(exc: BaseException, *codes: grpc.StatusCode) -> bool:
    return isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in codes


def generate_rollout(
    client,
    sync: PolicySync,
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[list[int]],
    cfg: PPOConfig,
    seed: int | None = None,
    phase: PhaseTimer = _no_phase,
    attempts: int = 3,
) -> Rollout:
    """Sample ``samples_per_prompt`` responses per prompt from the service at the trainer's version."""
    from rlhf.v1 import common_pb2

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
            if not _is_code(exc, grpc.StatusCode.FAILED_PRECONDITION) or attempt == attempts - 1:
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


# ---------------------------------------------------------------------------------------------------------
# prompts


@dataclass
class PromptSet:
    prompts: list[Prompt]
    token_ids: list[list[int]]


def load_prompt_set(cfg: PPOConfig, tokenizer) -> PromptSet:
    """The training prompts of the snapshot / JSONL file, tokenized once; prompts too long are left out."""
    from rlhf.trainer.data import load_prompts

    splits = load_prompts(cfg, kinds=cfg.prompt_kinds)
    budget = cfg.max_length - cfg.response_length
    prompts, ids, dropped = [], [], 0
    for prompt in splits.train:
        encoded = chat.encode_prompt(tokenizer, prompt)
        if len(encoded) > budget:
            dropped += 1
            continue
        prompts.append(prompt)
        ids.append(encoded)
    if dropped:
        log.warning(
            "left out %d prompts longer than max_length - response_length = %d tokens", dropped, budget
        )
    if not prompts:
        raise ValueError("data: no training prompts (check snapshot / data_file and prompt_kinds)")
    return PromptSet(prompts, ids)


def iteration_prompts(n_prompts: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """Indices of the prompts of ``iteration`` (0-based): a fresh permutation every pass over the prompts.

    A pure function of the iteration number, so a resumed run reads exactly the prompts of an uninterrupted one.
    """
    per_pass = n_prompts // per_iteration
    epoch, index = divmod(iteration, per_pass)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n_prompts, generator=generator)
    return order[index * per_iteration : (index + 1) * per_iteration].tolist()


# ---------------------------------------------------------------------------------------------------------
# the job


def _retry_policy(cfg: PPOConfig) -> RetryPolicy:
    return RetryPolicy(retry_timeout=cfg.service_retry_seconds)


def make_clients(cfg: PPOConfig):
    from rlhf.generation.client import PolicyClient
    from rlhf.reward.client import RewardClient

    policy_client = PolicyClient(
        cfg.generation_target,
        token=cfg.generation_token,
        timeout=cfg.service_timeout,
        retry=_retry_policy(cfg),
    )
    reward_client = RewardClient(
        cfg.reward_target, token=cfg.reward_token, timeout=cfg.service_timeout, retry=_retry_policy(cfg)
    )
    return policy_client, reward_client


class ServiceUnavailable(Exception):
    """A call to ``service`` failed with UNAVAILABLE / DEADLINE_EXCEEDED after the retry window."""

    def __init__(self, service: str, target: str, exc: grpc.RpcError):
        super().__init__(f"{service} service at {target}: {exc.code().name}: {exc.details()}")
        self.service = service


@contextlib.contextmanager
def calling(service: str, target: str) -> Iterator[None]:
    """Turn a call's final UNAVAILABLE / DEADLINE_EXCEEDED (retries exhausted) into ServiceUnavailable."""
    try:
        yield
    except grpc.RpcError as exc:
        if _is_code(exc, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ServiceUnavailable(service, target, exc) from exc
        raise


def run_ppo(cfg: PPOConfig) -> Path:
    """Run PPO per ``cfg`` (see the module docstring); returns RUN_DIR/final (an HF folder)."""
    from rlhf.trainer.job import TrainJob

    set_torch_threads(cfg.torch_threads)
    tokenizer = load_tokenizer(cfg.model)
    prompt_set = load_prompt_set(cfg, tokenizer)
    prompts_per_iteration = cfg.batch_size // cfg.samples_per_prompt
    if prompts_per_iteration > len(prompt_set.prompts):
        raise ValueError(
            f"batch_size: {prompts_per_iteration} prompts per iteration, but only {len(prompt_set.prompts)} prompts"
        )
    per_pass = len(prompt_set.prompts) // prompts_per_iteration
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_pass))

    with TrainJob(cfg, kind="ppo", total_steps=total) as job:
        policy = load_causal_lm(cfg.model)  # eval mode: no dropout, so recomputed logprobs match sampling
        reference = load_causal_lm(cfg.reference_model or cfg.model)
        reference.requires_grad_(False)
        value_head = ValueHead(policy.config.hidden_size)
        learner = PPOLearner(policy, value_head, cfg, total)
        job.track("policy", policy, tokenizer=tokenizer)
        job.track("value_head", value_head)
        job.track("optimizer", learner.optimizer)
        job.track("scheduler", learner.scheduler)
        state = job.resume()
        learner.kl_ctl.value = float(state.get("kl_coef", learner.kl_ctl.value))

        policy_client, reward_client = make_clients(cfg)
        sync = PolicySync(policy_client, cfg.push_dir, job.job_id)
        sync.version = int(state.get("policy_version", 0))

        def train_state() -> dict:
            return {"policy_version": sync.version, "kl_coef": learner.kl_ctl.value, "iteration": job.step}

        try:
            while not job.done:
                try:
                    iteration = job.step
                    with job.phase("idle"):
                        rows = iteration_prompts(
                            len(prompt_set.prompts), prompts_per_iteration, iteration, cfg.seed
                        )
                        prompts = [prompt_set.prompts[i] for i in rows]
                        ids = [prompt_set.token_ids[i] for i in rows]
                    with calling("generation", cfg.generation_target):
                        rollout = generate_rollout(
                            policy_client,
                            sync,
                            policy,
                            tokenizer,
                            prompts,
                            ids,
                            cfg,
                            # no seed: the service seeds each row from (seed, sample index) alone, so one
                            # seed for a batch of prompts would give every row the same random stream
                            seed=None,
                            phase=job.phase,
                        )
                    with job.phase("score"), calling("reward", cfg.reward_target):
                        score_rollout(reward_client, rollout, cfg.normalize_scores)
                except ServiceUnavailable as exc:
                    end_on_service_fault(job, train_state(), exc, cfg)
                with job.phase("reference"):
                    ref = reference_logprobs(reference, rollout, cfg.temperature, cfg.micro_batch_size)
                metrics = learner.step(rollout, ref, sync.version, phase=job.phase)
                sync.version += 1  # the updated weights; pushed at the start of the next iteration
                metrics["policy_version"] = rollout.policy_version
                tokens = int(rollout.attention_mask.sum())
                job.end_step(metrics, train_state=train_state(), tokens=tokens)
            final = job.run_dir / "final"
            if job.completed:
                try:
                    with job.phase("sync"), calling("generation", cfg.generation_target):
                        sync.push(policy)  # the generation service serves the final policy
                except ServiceUnavailable as exc:
                    end_on_service_fault(job, train_state(), exc, cfg)
                save_final(policy, value_head, tokenizer, final, sync.version)
            job.finish(final if job.completed else None)
        finally:
            sync.close()
            policy_client.close()
            reward_client.close()
    return final


def end_on_service_fault(job, train_state: dict, exc: ServiceUnavailable, cfg: PPOConfig):
    """Checkpoint at the current step boundary, then end the job with a message saying what to do."""
    checkpoint = job.save_checkpoint(train_state)
    raise ServiceDown(
        f"{exc} (still unavailable after service_retry_seconds={cfg.service_retry_seconds:g}); "
        f"checkpoint written at step {checkpoint.step} ({checkpoint.path}); bring the {exc.service} service "
        "back and run again with --resume"
    ) from exc


def save_final(policy, value_head: ValueHead, tokenizer, folder: Path, version: int) -> None:
    """RUN_DIR/final: the policy as an HF folder (the generation service loads it), value head beside it."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_file(
        {k: v.contiguous() for k, v in value_head.state_dict().items()},
        str(folder / "value_head.safetensors"),
    )
    (folder / "rlhf_policy.json").write_text(json.dumps({"policy_version": version, "trained_with": "ppo"}))


__all__ = [
    "ForwardOut",
    "PPOLearner",
    "PolicySync",
    "PromptSet",
    "Rollout",
    "ServiceDown",
    "ValueHead",
    "build_rollout",
    "generate_rollout",
    "iteration_prompts",
    "load_prompt_set",
    "policy_state_dict",
    "reference_logprobs",
    "response_forward",
    "run_ppo",
    "save_final",
    "score_rollout",
]
