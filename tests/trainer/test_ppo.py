"""The PPO trainer's pieces without services: rollout layout, forwards, the update's direction, weight files."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from rlhf.core.models import causal_lm_logits, load_causal_lm, load_tokenizer
from rlhf.trainer.config import PPOConfig
from rlhf.trainer.ppo import (
    MIN_SHARED_PREFIX,
    PPOLearner,
    ValueHead,
    build_rollout,
    common_prefix_length,
    iteration_prompts,
    policy_state_dict,
    reference_logprobs,
    response_forward,
)
from rlhf.trainer.rl_math import logprobs_from_logits, ppo_policy_loss, ppo_value_loss

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny(tiny_lm_path):
    return load_causal_lm(tiny_lm_path), load_tokenizer(tiny_lm_path)


def _rollout(tokenizer, prompts_ids, responses, logprobs=None, eos=None, share_prefix=True):
    logprobs = logprobs or [[-1.0] * len(r) for r in responses]
    eos = eos if eos is not None else [r[-1] == tokenizer.eos_token_id for r in responses]
    return build_rollout(
        [f"p{i}" for i in range(len(responses))],
        prompts_ids,
        responses,
        logprobs,
        eos,
        ["x"] * len(responses),
        pad_token_id=tokenizer.pad_token_id,
        policy_version=3,
        share_prefix=share_prefix,
    )


def test_build_rollout_left_pads_prompts_and_right_pads_responses(tiny):
    _, tok = tiny
    pad, eos = tok.pad_token_id, tok.eos_token_id
    r = _rollout(tok, [[5, 6, 7], [8]], [[10, eos], [11, 12, 13]], [[-0.5, -0.25], [-1.0, -2.0, -3.0]])
    assert r.context_length == 3
    assert r.input_ids.tolist() == [[5, 6, 7, 10, eos, pad], [pad, pad, 8, 11, 12, 13]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert r.responses.tolist() == [[10, eos, pad], [11, 12, 13]]
    assert r.mask.tolist() == [[True, True, False], [True, True, True]]
    assert r.gen_logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]]
    assert r.ended_with_eos.tolist() == [True, False]
    with pytest.raises(ValueError, match="logprobs"):
        _rollout(tok, [[5]], [[10, 11]], [[-1.0]])
    with pytest.raises(ValueError, match="at least one token"):
        _rollout(tok, [[5]], [[]], [[]], eos=[False])


def test_response_forward_of_a_padded_batch_matches_each_row_alone(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = [[1, 20, 21, 22, 23, 24], [1, 30]]
    responses = [[40, 41, eos], [50, 51, 52, 53, 54]]
    r = _rollout(tok, prompts, responses)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        out = response_forward(model, r, None, TEMPERATURE, head)
        for row, (p, resp) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([p + resp])
            logits = causal_lm_logits(model, ids, torch.ones_like(ids))[:, len(p) - 1 : -1]
            expected = logprobs_from_logits(logits, torch.tensor([resp]), TEMPERATURE)[0]
            torch.testing.assert_close(out.logprobs[row, : len(resp)], expected, atol=1e-5, rtol=1e-5)
            hidden = model.base_model(input_ids=ids).last_hidden_state[0, len(p) - 1 : -1]
            torch.testing.assert_close(out.values[row, : len(resp)], head(hidden), atol=1e-5, rtol=1e-5)
        ref = reference_logprobs(model, r, TEMPERATURE, micro_batch_size=1)
    torch.testing.assert_close(ref, out.logprobs.masked_fill(~r.mask, 0.0), atol=1e-5, rtol=1e-5)


def test_a_common_prompt_prefix_stays_in_front_with_the_padding_after_it(tiny):
    _, tok = tiny
    pad = tok.pad_token_id
    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    r = _rollout(tok, [[1, 2, 3, 4], [1, 2, 9]], [[7], [8]], eos=[False, False])
    assert r.prefix_length == 2
    assert r.input_ids.tolist() == [[1, 2, 3, 4, 7], [1, 2, pad, 9, 8]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]]
    # a prompt that is all prefix keeps its last token as its own
    assert _rollout(tok, [[1, 2, 3], [1, 2, 3, 4]], [[7], [8]], eos=[False, False]).prefix_length == 2


def test_the_shared_prefix_forward_equals_the_full_forward_with_gradients(tiny_lm_path):
    model = load_causal_lm(tiny_lm_path)
    tok = load_tokenizer(tiny_lm_path)
    eos = tok.eos_token_id
    system = list(range(30, 30 + MIN_SHARED_PREFIX + 4))
    prompts = [system + [20, 21, 22], system + [23], system + [24, 25]]
    responses = [[40, 41, eos], [50, 51, 52, 53], [60]]
    shared = _rollout(tok, prompts, responses)
    full = _rollout(tok, prompts, responses, share_prefix=False)
    assert shared.prefix_length == len(system) and full.prefix_length == 0
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    results = []
    for rollout in (shared, full):
        model.zero_grad()
        head.zero_grad()
        out = response_forward(model, rollout, torch.tensor([2, 0, 1]), TEMPERATURE, head)
        mask = rollout.mask[[2, 0, 1]]
        loss = (out.logprobs * mask).sum() + (out.values * mask).sum()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out.logprobs * mask, out.values * mask, grads, head.summary.weight.grad.clone()))
    (lp_s, v_s, g_s, h_s), (lp_f, v_f, g_f, h_f) = results
    torch.testing.assert_close(lp_s, lp_f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_s, v_f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h_s, h_f, atol=1e-4, rtol=1e-4)
    assert len(g_s) == len(g_f)
    for a, b in zip(g_s, g_f, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


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
def test_ppo_step_makes_the_high_scoring_response_more_likely(tiny_lm_path, num_mini_batches, micro):
    """A toy rollout: one response scored +1, one -1; after PPO steps their logprobs move apart."""
    model = load_causal_lm(tiny_lm_path)
    tok = load_tokenizer(tiny_lm_path)
    eos = tok.eos_token_id
    prompts = [[1, 20, 21]] * 4
    responses = [[40, 41, 42, eos], [60, 61, 62, eos]] * 2
    r = _rollout(tok, prompts, responses)
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


def test_value_head_starts_on_the_reward_scale(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    r = _rollout(tok, [[1, 2]] * 2, [[40, eos], [41, 42]])
    r.scores = r.raw_scores = torch.tensor([3.0, 5.0])
    cfg = PPOConfig(model="x", batch_size=2, micro_batch_size=2, missing_eos_penalty=1.0, learning_rate=1e-9)
    head = ValueHead(model.config.hidden_size)
    stats = PPOLearner(model, head, cfg, 1).step(r, torch.zeros(2, 2), policy_version=0)
    # (3 + (5 - 1 for the missing EOS)) / 2
    assert stats["value_mean"] == pytest.approx(3.5, abs=1e-3)


def test_iteration_prompts_cover_every_prompt_once_per_pass_and_are_reproducible():
    first_pass = [i for it in range(5) for i in iteration_prompts(10, 2, it, seed=7)]
    assert sorted(first_pass) == list(range(10))
    assert iteration_prompts(10, 2, 3, seed=7) == iteration_prompts(10, 2, 3, seed=7)
    assert iteration_prompts(10, 2, 5, seed=7) != iteration_prompts(10, 2, 0, seed=7)  # new order next pass


def test_policy_state_dict_drops_tied_duplicates(tiny):
    model, _ = tiny
    state = policy_state_dict(model)
    assert model.config.tie_word_embeddings
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert len(state) == len(model.state_dict()) - 1


@pytest.mark.parametrize("num_mini_batches, micro, version", [(1, 4, 3), (2, 1, 3), (2, 1, 4)])
def test_rloo_step_moves_each_prompt_towards_its_better_sample_without_touching_the_value_head(
    tiny_lm_path, num_mini_batches, micro, version
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
    r = _rollout(tok, prompts, responses)
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
