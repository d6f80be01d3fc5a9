"""The PPO learner on tiny models: the update's direction, RLOO, the value head's start."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from rlhf.core.models import load_causal_lm, load_tokenizer
from rlhf.rl.forward import ForwardOut, ValueHead, response_forward
from rlhf.rl.learner import (
    Advantages,
    OldPolicy,
    PPOLearner,
    estimate_advantages,
    first_forward_mode,
    ppo_loss,
    shaped_scores,
)
from rlhf.rl.math import ppo_policy_loss, ppo_value_loss
from rlhf.rl.rollout import build_rollout
from rlhf.trainer.config import PPOConfig


def test_policy_loss_gradient_raises_logprobs_of_positive_advantages_only_inside_the_clip():
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # tokens 0, 1 inside the clip range; token 2 already far above (ratio e^0.5 with A > 0: clipped),
    # token 3 far below (ratio e^-0.5 with A < 0: clipped)
    logprobs = torch.tensor([[0.0, 0.0, 0.5, -0.5]], requires_grad=True)
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    loss.backward()
    grad = logprobs.grad[0]
    assert grad[0] < 0  # gradient descent raises the logprob of a good token
    assert grad[1] > 0  # ... and lowers that of a bad one
    assert grad[2] == 0 and grad[3] == 0  # no push beyond the trust region
    assert float(stats["clipfrac"]) == pytest.approx(0.5)


def test_value_loss_gradient_moves_values_towards_returns():
    values = torch.tensor([[0.0, 2.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0]])
    loss, _ = ppo_value_loss(values, values.detach(), returns, torch.ones(1, 2, dtype=torch.bool), 10.0)
    loss.backward()
    assert values.grad[0, 0] < 0 < values.grad[0, 1]


@pytest.mark.parametrize("num_mini_batches, micro", [(1, 4), (2, 1)])
def test_ppo_step_makes_the_high_scoring_response_more_likely(
    tiny_lm_path, num_mini_batches, micro, make_rollout
):
    """A toy rollout: one response scored +1, one -1; after PPO steps their logprobs move apart."""
    model = load_causal_lm(tiny_lm_path)
    tok = load_tokenizer(tiny_lm_path)
    eos = tok.eos_token_id
    prompts = [[1, 20, 21]] * 4
    responses = [[40, 41, 42, eos], [60, 61, 62, eos]] * 2
    r = make_rollout(tok, prompts, responses)
    with torch.no_grad():
        before = response_forward(model, r, None, 1.0).logprobs
    r.gen_logprobs = before.clone()
    r.scores = r.raw_scores = torch.tensor([1.0, -1.0, 1.0, -1.0])
    cfg = PPOConfig(
        model=str(tiny_lm_path),
        batch_size=4,
        micro_batch_size=micro,
        num_mini_batches=num_mini_batches,
        num_ppo_epochs=2,
        learning_rate=3e-3,
        temperature=1.0,
        kl_coef=0.0,
        adaptive_kl=False,
    )
    head = ValueHead(model.config.hidden_size)
    learner = PPOLearner(model, head, cfg, total_iterations=10)
    ref = before.clone()
    stats = learner.step(r, ref, policy_version=3)
    with torch.no_grad():
        after = response_forward(model, r, None, 1.0).logprobs
    good = (after[0].sum() - before[0].sum()).item()
    bad = (after[1].sum() - before[1].sum()).item()
    assert good > 0 > bad
    assert bool(head.initialized) and head.summary.bias.item() == pytest.approx(0.0, abs=0.05)
    assert stats["logprob_mismatch_max"] < 1e-5  # the rollout's logprobs are this policy's
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5) and stats["reward_mean"] == 0.0
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "grad_norm"):
        assert torch.isfinite(torch.tensor(stats[key])), key


def test_value_head_starts_on_the_reward_scale(tiny, make_rollout):
    model, tok = tiny
    eos = tok.eos_token_id
    r = make_rollout(tok, [[1, 2]] * 2, [[40, eos], [41, 42]])
    r.scores = r.raw_scores = torch.tensor([3.0, 5.0])
    cfg = PPOConfig(model="x", batch_size=2, micro_batch_size=2, missing_eos_penalty=1.0, learning_rate=1e-9)
    head = ValueHead(model.config.hidden_size)
    stats = PPOLearner(model, head, cfg, 1).step(r, torch.zeros(2, 2), policy_version=0)
    # (3 + (5 - 1 for the missing EOS)) / 2
    assert stats["value_mean"] == pytest.approx(3.5, abs=1e-3)


@pytest.mark.parametrize("num_mini_batches, micro, version", [(1, 4, 3), (2, 1, 3), (2, 1, 4)])
def test_rloo_step_moves_each_prompt_towards_its_better_sample_without_touching_the_value_head(
    tiny_lm_path, num_mini_batches, micro, version, make_rollout
):
    """Two prompts x two samples; in each group one sample scores higher (the second group is offset by +5,
    which the leave-one-out baseline removes). The better sample of each prompt becomes more likely.

    With several minibatches and the rollout from the trainer's version (3), no separate forward computes the
    old logprobs (the service's are used); a rollout of another version (4) gets the trainer's recompute."""
    model = load_causal_lm(tiny_lm_path)
    tok = load_tokenizer(tiny_lm_path)
    eos = tok.eos_token_id
    prompts = [[1, 20, 21], [1, 20, 21], [1, 30, 31], [1, 30, 31]]
    responses = [[40, 41, 42, eos], [60, 61, 62, eos], [70, 71, 72, eos], [50, 51, 52, eos]]
    r = make_rollout(tok, prompts, responses)
    with torch.no_grad():
        before = response_forward(model, r, None, 1.0).logprobs
    r.gen_logprobs = before.clone()
    r.scores = r.raw_scores = torch.tensor([1.0, -1.0, 6.0, 4.0])
    torch.manual_seed(0)  # the minibatch order
    cfg = PPOConfig(
        model=str(tiny_lm_path),
        batch_size=4,
        micro_batch_size=micro,
        num_mini_batches=num_mini_batches,
        samples_per_prompt=2,
        advantage_estimator="rloo",
        num_ppo_epochs=2,
        learning_rate=3e-3,
        temperature=1.0,
        kl_coef=0.0,
        adaptive_kl=False,
    )
    head = ValueHead(model.config.hidden_size)
    learner = PPOLearner(model, head, cfg, total_iterations=10)
    phases = []

    def phase(name):
        phases.append(name)
        return contextlib.nullcontext()

    stats = learner.step(r, before.clone(), policy_version=version, phase=phase)
    assert ("values" in phases) == (num_mini_batches > 1 and version != 3)
    assert stats["logprob_mismatch_max"] < 1e-5  # measured on an update forward when the pass is skipped
    assert 0 < stats["entropy"] < math.log(model.config.vocab_size) + 1e-3
    head_before = head.summary.weight.detach().clone()
    with torch.no_grad():
        after = response_forward(model, r, None, 1.0).logprobs
    delta = [(after[i].sum() - before[i].sum()).item() for i in range(4)]
    assert delta[0] > 0 > delta[1] and delta[2] > 0 > delta[3]
    assert stats["loss"] == pytest.approx(stats["policy_loss"])
    # nothing learns or uses values: no value statistics (no rlhf_ppo_value_loss series, no report panel)
    assert not {"value_loss", "vf_clipfrac", "explained_variance", "value_mean"} & set(stats)
    learner.step(r, before.clone(), policy_version=version)
    assert torch.equal(head.summary.weight, head_before)  # no value loss: the value head does not learn


def test_rloo_needs_groups():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PPOConfig(batch_size=4, advantage_estimator="rloo")


def _scored_rollout(scores, eos=(True, True)):
    rollout = build_rollout(
        ["a", "b"],
        [[1], [1]],
        [[5, 6], [7, 8]],
        [[-1.0, -1.0], [-1.0, -1.0]],
        list(eos),
        ["x", "y"],
        pad_token_id=0,
        policy_version=0,
    )
    rollout.scores = rollout.raw_scores = torch.tensor(scores)
    return rollout


def test_estimate_advantages_shapes_rewards_with_kl_then_gae_then_whitens_hand_values():
    rollout = _scored_rollout([1.0, -1.0])
    cfg = PPOConfig(batch_size=2, micro_batch_size=2, gamma=1.0, lam=1.0)
    logprobs = torch.full((2, 2), -1.0)
    ref = torch.tensor([[-2.0, -1.0], [-1.0, -1.0]])  # k1 KL: 1 on the first token of the first response
    adv = estimate_advantages(rollout, logprobs, ref, torch.zeros(2, 2), 0.5, cfg)
    assert adv.kl.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert adv.non_score_reward.tolist() == [[-0.5, 0.0], [0.0, 0.0]]
    # rewards [[-0.5, 1], [0, -1]]; zero values, gamma = lam = 1: advantages are the rewards to go
    assert adv.returns.tolist() == [[0.5, 1.0], [-1.0, -1.0]]
    raw = torch.tensor([[0.5, 1.0], [-1.0, -1.0]])
    mean, var = -0.125, 3.1875 / 3  # unbiased variance of the four advantages
    assert torch.allclose(adv.advantages, (raw - mean) / math.sqrt(var + 1e-8), atol=1e-6)


def test_estimate_advantages_with_rloo_uses_the_other_sample_as_baseline():
    rollout = _scored_rollout([1.0, -1.0])
    cfg = PPOConfig(batch_size=2, micro_batch_size=2, samples_per_prompt=2, advantage_estimator="rloo")
    zeros = torch.zeros(2, 2)
    adv = estimate_advantages(rollout, zeros, zeros, zeros, 0.1, cfg)
    assert adv.returns.tolist() == [[1.0, 1.0], [-1.0, -1.0]]
    # per sequence 1 - (-1) = 2 and -2; whitened over four tokens: +-2 / sqrt(16 / 3)
    expected = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) * 2 / math.sqrt(16 / 3 + 1e-8)
    assert torch.allclose(adv.advantages, expected, atol=1e-6)


def test_shaped_scores_subtract_the_missing_eos_penalty_and_clip():
    rollout = _scored_rollout([3.0, 3.0], eos=(True, False))
    cfg = PPOConfig(batch_size=2, micro_batch_size=2, missing_eos_penalty=1.0, reward_clip=2.5)
    assert shaped_scores(rollout, cfg).tolist() == [2.5, 2.0]


def test_first_forward_mode_fuses_one_micro_batch_and_skips_only_for_rloo_with_reusable_logprobs():
    gae = PPOConfig(batch_size=4, micro_batch_size=4, num_mini_batches=2)
    rloo = PPOConfig(batch_size=4, micro_batch_size=4, samples_per_prompt=2, advantage_estimator="rloo")
    assert first_forward_mode(PPOConfig(batch_size=4, micro_batch_size=4), 4, 4, reuse=True) == "fused"
    assert first_forward_mode(gae, 4, 2, reuse=True) == "separate"
    assert first_forward_mode(rloo, 4, 2, reuse=True) == "skipped"
    assert first_forward_mode(rloo, 4, 2, reuse=False) == "separate"


def test_ppo_loss_adds_the_weighted_value_loss_and_reports_its_parts():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    values = torch.tensor([[0.0, 0.0]], requires_grad=True)
    out = ForwardOut(logprobs, values, torch.zeros(1, 2, 3))
    old = OldPolicy(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    adv = Advantages(
        torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2), torch.zeros(1, 2)
    )
    cfg = PPOConfig(batch_size=1, micro_batch_size=1)
    mask, rows = torch.ones(1, 2, dtype=torch.bool), torch.tensor([0])
    loss, stats = ppo_loss(out, old, adv, rows, mask, cfg, vf_coef=0.5)
    # ratio 1: pg_loss = -mean(advantages) = 0; vf_loss = 0.5 * mean((v - R)^2) = 0.5 * (1 + 9) / 2 = 2.5
    assert stats["policy_loss"] == pytest.approx(0.0) and stats["value_loss"] == pytest.approx(2.5)
    assert float(loss.detach()) == pytest.approx(0.5 * 2.5)
    assert stats["ratio"] == pytest.approx(1.0) and stats["clipfrac"] == 0.0
    _, no_values = ppo_loss(out, old, adv, rows, mask, cfg, vf_coef=0.0)
    assert "value_loss" not in no_values and "vf_clipfrac" not in no_values
