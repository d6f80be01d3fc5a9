"""The PPO math against values computed by hand (in the comments), not by the same formulas."""

import math

import pytest
import torch

from rlhf.rl.math import (
    AdaptiveKLController,
    FixedKLController,
    assert_finite,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    first_true_indices,
    kl_k1,
    kl_k3,
    kl_penalty,
    last_token_indices,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    response_lengths,
    response_mask_from_lengths,
    truncate_response_after_eos,
)

torch.set_num_threads(1)
NAN = float("nan")


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual).double(), torch.tensor(expected).double(), atol=atol, rtol=0
    )


# --- log-probabilities and entropy ------------------------------------------------------------------------


def test_logprobs_from_logits_hand_values_and_temperature():
    # logits [0, ln 3]: softmax = [1/4, 3/4]. At temperature 0.5 they become [0, 2 ln 3]: exp -> [1, 9], p = [0.1, 0.9].
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, tokens), [[math.log(0.75), math.log(0.25)]])
    close(logprobs_from_logits(logits, tokens, temperature=0.5), [[math.log(0.9), math.log(0.1)]])


def test_logprobs_from_logits_matches_categorical_at_temperature_0_7():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    expected = torch.distributions.Categorical(logits=logits / 0.7).log_prob(tokens)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens, temperature=0.7), expected)
    half = logprobs_from_logits(logits.bfloat16(), tokens, temperature=0.7)
    torch.testing.assert_close(half.float(), expected, atol=0.1, rtol=0.02)


def test_logprobs_from_logits_passes_gradients_and_rejects_zero_temperature():
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[0]])).sum().backward()
    # d log softmax_0 / d logits = onehot(0) - p = [1 - 0.5, -0.5]
    close(logits.grad, [[[0.5, -0.5]]])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.tensor([[0]]), temperature=0.0)


def test_entropy_from_logits_hand_values():
    # uniform over 4 -> ln 4; p = [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    close(entropy_from_logits(logits), [[math.log(4.0), 0.562335]])


def test_entropy_from_logits_matches_categorical_with_chunks_and_temperature():
    logits = torch.randn(2, 7, 13, generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Categorical(logits=logits / 0.7).entropy()
    torch.testing.assert_close(entropy_from_logits(logits, temperature=0.7, chunk_size=3), expected)


# --- masked statistics --------------------------------------------------------------------------------------


def test_masked_mean_and_var_hand_values():
    values = torch.tensor([[1.0, NAN], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    close(masked_mean(values, mask), 8 / 3)
    close(masked_mean(values, mask, dim=1), [1.0, 3.5])
    # deviations from 8/3: -5/3, 1/3, 4/3 -> squares sum 42/9; biased /3 = 14/9, unbiased /2 = 7/3
    close(masked_var(values, mask, unbiased=False), 14 / 9)
    close(masked_var(values, mask), 7 / 3)
    close(masked_mean(values, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not nan
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, torch.tensor([[True, False], [False, False]]))


def test_masked_mean_accepts_float_masks():
    close(masked_mean(torch.tensor([2.0, 4.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])), 3.0)


def test_masked_whiten_mean_0_var_1_over_mask_and_ignores_masked_entries():
    # [2, 4, 6]: mean 4, unbiased var ((-2)^2 + 0 + 2^2) / 2 = 4, std 2 -> [-1, 0, 1]
    values = torch.tensor([[2.0, 4.0, 1e6], [6.0, NAN, -7.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    whitened = masked_whiten(values, mask)
    close(whitened, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    close(masked_whiten(values, mask, shift_mean=False), [[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]])

    big = torch.randn(4, 9, generator=torch.Generator().manual_seed(2)) * 5 + 3
    big_mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    w = masked_whiten(big, big_mask)
    close(masked_mean(w, big_mask), 0.0)
    close(masked_var(w, big_mask), 1.0, atol=1e-4)
    altered = torch.where(big_mask, big, torch.full_like(big, 1e9))
    torch.testing.assert_close(masked_whiten(altered, big_mask), w)


def test_explained_variance_hand_values():
    returns = torch.tensor([1.0, 2.0, 3.0, 50.0])
    mask = torch.tensor([True, True, True, False])
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(torch.tensor([2.0, 2.0, 2.0, 0.0]), returns, mask), 0.0)
    # residual [-0.5, 0, 0.5]: var 1/6; Var[returns] = 2/3 -> 1 - 1/4
    close(explained_variance(torch.tensor([1.5, 2.0, 2.5, 0.0]), returns, mask), 0.75)
    assert torch.isnan(explained_variance(returns, torch.ones(4), mask))


# --- responses ------------------------------------------------------------------------------------------------


def test_first_true_indices_gives_length_when_none():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]


def test_truncate_lengths_and_mask_keep_the_first_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    truncated = truncate_response_after_eos(responses, eos, pad)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    lengths = response_lengths(truncated, eos)
    assert lengths.tolist() == [2, 4, 1]
    mask = response_mask_from_lengths(lengths, 4)
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    assert last_token_indices(mask).tolist() == [1, 3, 0]


def test_truncate_when_pad_is_eos():
    truncated = truncate_response_after_eos(torch.tensor([[5, 2, 7, 8]]), eos_token_id=2, pad_token_id=2)
    assert truncated.tolist() == [[5, 2, 2, 2]]
    assert response_lengths(truncated, 2).tolist() == [2]


def test_last_token_indices_handles_holes_and_rejects_empty_rows():
    assert last_token_indices(torch.tensor([[1, 1, 0], [1, 0, 1]])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="at least one real token"):
        last_token_indices(torch.tensor([[1, 0], [0, 0]]))


# --- KL and shaped rewards ----------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    # p = 1/2, p_ref = 1/4: k1 = ln 2 = 0.693147; r = 1/2: k3 = (0.5 - 1) - ln 0.5 = 0.193147
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_k1(logp, ref), [0.693147])
    close(kl_k3(logp, ref), [0.193147])
    close(kl_penalty(logp, ref, "k1"), [0.693147])
    close(kl_penalty(logp, ref, "k3"), [0.193147])
    close(kl_penalty(ref, logp, "k1"), [-0.693147])
    close(kl_penalty(ref, logp, "abs"), [0.693147])
    close(kl_penalty(ref, logp, "mse"), [0.5 * 0.693147**2])
    # swapped: p = 1/4, p_ref = 1/2, r = 2: k3 = (2 - 1) - ln 2 = 0.306853
    close(kl_penalty(ref, logp, "k3"), [0.306853])
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "full")


def test_k3_is_never_negative_and_zero_only_when_equal():
    grid = torch.linspace(-8, 0, 41)
    logp, ref = torch.meshgrid(grid, grid, indexing="ij")
    k3 = kl_k3(logp, ref)
    assert bool((k3 >= 0).all())
    assert bool((k3[logp != ref] > 0).all())
    assert bool((k3[logp == ref] == 0).all())


def test_k1_and_k3_estimate_the_true_kl_under_policy_samples():
    # p = [0.5, 0.5], p_ref = [0.9, 0.1]: KL(p||p_ref) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826
    p, p_ref = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(4))
    logp, ref = p.log()[samples], p_ref.log()[samples]
    close(kl_k1(logp, ref).mean(), 0.510826, atol=0.01)
    close(kl_k3(logp, ref).mean(), 0.510826, atol=0.01)


LOGP = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
# k1 = logp - ref = [[0.1, 0.2, 5.0], [0.0, -0.1, 0.3]]
REF = torch.tensor([[-1.1, -1.2, -6.0], [-2.0, -1.9, -2.3]])
MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_compute_rewards_puts_the_score_on_the_last_real_token():
    rewards, non_score_reward, kl = compute_rewards(torch.tensor([1.0, 2.0]), LOGP, REF, MASK, kl_coef=0.5)
    close(kl, [[0.1, 0.2, 0.0], [0.0, -0.1, 0.3]])  # the masked 5.0 is gone
    close(non_score_reward, [[-0.05, -0.1, 0.0], [0.0, 0.05, -0.15]])
    close(rewards, [[-0.05, 0.9, 0.0], [0.0, 0.05, 1.85]])


def test_compute_rewards_missing_eos_penalty_normalisation_and_clip():
    scores = torch.tensor([1.0, 2.0])
    ended = torch.tensor([True, False])
    rewards, _, _ = compute_rewards(
        scores, LOGP, REF, MASK, kl_coef=0.5, ended_with_eos=ended, missing_eos_penalty=1.0
    )
    close(rewards, [[-0.05, 0.9, 0.0], [0.0, 0.05, 0.85]])  # row 2 score 2 - 1 = 1
    # normalised (s - 1) / 2 -> [0, 0.5]; penalty -> [0, -0.5]; clipped to 0.25 -> [0, -0.25]
    rewards, _, _ = compute_rewards(
        scores,
        LOGP,
        REF,
        MASK,
        kl_coef=0.5,
        ended_with_eos=ended,
        missing_eos_penalty=1.0,
        score_mean=1.0,
        score_std=2.0,
        reward_clip=0.25,
    )
    close(rewards, [[-0.05, -0.1, 0.0], [0.0, 0.05, -0.40]])
    with pytest.raises(ValueError, match="ended_with_eos"):
        compute_rewards(scores, LOGP, REF, MASK, kl_coef=0.5, missing_eos_penalty=1.0)


def test_compute_rewards_with_k3_is_a_penalty():
    _, non_score_reward, kl = compute_rewards(torch.zeros(2), LOGP, REF, MASK, kl_coef=0.1, kind="k3")
    assert bool((kl >= 0).all()) and bool((non_score_reward <= 0).all())
    # row 1 token 1: r = exp(-0.1): (0.904837 - 1) + 0.1 = 0.004837
    close(kl[0, 0], 0.004837)


# --- GAE ------------------------------------------------------------------------------------------------------


def test_compute_gae_hand_values():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), r = [1, 0, 2], V = [0.5, 1, 1.5], V after the end = 0
    #   t=2: delta = 2 + 0 - 1.5 = 0.5                 A = 0.5
    #   t=1: delta = 0 + 0.9 * 1.5 - 1 = 0.35          A = 0.35 + 0.72 * 0.5 = 0.71
    #   t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4           A = 1.4 + 0.72 * 0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    close(advantages, [[1.9112, 0.71, 0.5]])
    close(returns, [[2.4112, 1.71, 2.0]])


def test_compute_gae_ends_the_episode_at_the_last_real_token():
    # r = [1, 2, pad], V = [0.5, 1.5, pad]: t=1: delta = 2 - 1.5 = 0.5, A = 0.5
    #   t=0: delta = 1 + 0.9 * 1.5 - 0.5 = 1.85, A = 1.85 + 0.72 * 0.5 = 2.21; returns [2.71, 2.0, 0]
    rewards = torch.tensor([[1.0, 2.0, 99.0], [1.0, 99.0, 2.0]])
    values = torch.tensor([[0.5, 1.5, 77.0], [0.5, 77.0, 1.5]])
    mask = torch.tensor([[True, True, False], [True, False, True]])  # row 2: a hole is skipped
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[2.21, 0.5, 0.0], [2.21, 0.0, 0.5]])
    close(returns, [[2.71, 2.0, 0.0], [2.71, 0.0, 2.0]])


def test_compute_gae_with_gamma_lam_1_gives_reward_to_go():
    # Monte Carlo: returns = sum of the rewards from t on = [3, 2, 2] whatever the values
    advantages, returns = compute_gae(
        torch.tensor([[1.0, 0.0, 2.0]]),
        torch.tensor([[0.3, -4.0, 9.0]]),
        torch.ones(1, 3),
        gamma=1.0,
        lam=1.0,
    )
    close(returns, [[3.0, 2.0, 2.0]])
    close(advantages, [[2.7, 6.0, -7.0]])


def test_compute_gae_with_lam_0_is_the_one_step_td_error():
    # lam = 0: A_t = r_t + gamma V_{t+1} - V_t = [1 + 0.9 - 0.5, 0 + 1.35 - 1, 2 - 1.5]
    advantages, _ = compute_gae(
        torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]]), torch.ones(1, 3), gamma=0.9, lam=0.0
    )
    close(advantages, [[1.4, 0.35, 0.5]])


# --- losses ---------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_hand_values_and_gradients():
    # cliprange 0.2; tokens: a) ratio 1, A = +1 -> -1
    #   b) ratio e^0.5 = 1.648721, A = +1 -> max(-1.648721, -1.2) = -1.2 (clipped: no gradient)
    #   c) ratio e^0.5, A = -1 -> max(1.648721, 1.2) = 1.648721 (unclipped: the pessimistic bound)
    #   d) masked out
    # loss = (-1 - 1.2 + 1.648721) / 3 = -0.183760; clipfrac = 1/3; approx_kl = 0.5 * (0 + .25 + .25) / 3
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    logprobs = torch.tensor([[-1.0, -0.5, -0.5, 3.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    close(loss.detach(), -0.183760)
    close(stats["clipfrac"], 1 / 3)
    close(stats["approx_kl"], 0.25 / 3)
    close(stats["approx_kl_k3"], 2 * (1.648721 - 1 - 0.5) / 3)
    close(stats["ratio_mean"], (1 + 2 * 1.648721) / 3)
    assert not any(s.requires_grad for s in stats.values())
    loss.backward()
    # d/dlogp of -A * exp(logp - old) / 3 = -A * ratio / 3
    close(logprobs.grad, [[-1 / 3, 0.0, 1.648721 / 3, 0.0]])
    assert logprobs.grad[0, 0] < 0  # positive advantage: descending the loss raises the token's probability


def test_ppo_policy_loss_is_clipped_below_for_negative_advantage():
    # ratio e^-0.5 = 0.606531 < 0.8 with A = -1: max(0.606531, 0.8) = 0.8, constant -> no gradient
    logprobs = torch.tensor([[-1.5]], requires_grad=True)
    loss, stats = ppo_policy_loss(
        logprobs, torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2
    )
    close(loss.detach(), 0.8)
    close(stats["clipfrac"], 1.0)
    loss.backward()
    close(logprobs.grad, [[0.0]])


def test_ppo_value_loss_hand_values_and_clipping():
    # cliprange_value 0.2
    #   a) v = 1, old = 1, R = 0: both terms 1                                 -> 1
    #   b) v = 2, old = 1, R = 3: clip(v) = 1.2; (2-3)^2 = 1, (1.2-3)^2 = 3.24 -> 3.24 (clipped)
    #   c) v = 0, old = 0.5, R = 0: clip(v) = 0.3; 0 vs 0.09                   -> 0.09 (clipped)
    #   d) masked out
    # loss = 0.5 * (1 + 3.24 + 0.09) / 3 = 0.721667; vf_clipfrac = 2/3
    values = torch.tensor([[1.0, 2.0, 0.0, 50.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 3.0, 0.0, -50.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, vf_clipfrac = ppo_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    close(loss.detach(), 0.721667)
    close(vf_clipfrac, 2 / 3)
    loss.backward()
    # a) d/dv 0.5 (v - R)^2 / 3 = (1 - 0) / 3; b), c) the clipped term is constant in v; d) masked
    close(values.grad, [[1 / 3, 0.0, 0.0, 0.0]])


def test_ppo_value_loss_without_clipping_is_half_mse():
    values = torch.tensor([[1.0, 2.0]])
    loss, vf_clipfrac = ppo_value_loss(values, values, torch.tensor([[0.0, 4.0]]), torch.ones(1, 2), 0.2)
    close(loss, 0.5 * (1 + 4) / 2)
    close(vf_clipfrac, 0.0)


# --- KL controllers -------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 12 > 6: error clipped to +0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512 -> 0.201024
    assert ctl.update(12.0, n_steps=256) == pytest.approx(0.201024)
    assert ctl.value == pytest.approx(0.201024)
    # KL 3 < 6: error -0.5 clipped to -0.2; mult = 0.99488 -> 0.201024 * 0.99488 = 0.199995
    ctl.update(torch.tensor(3.0), n_steps=256)
    assert ctl.value == pytest.approx(0.199995, abs=1e-6)
    before = ctl.value
    ctl.update(6.0, n_steps=256)  # on target: unchanged
    assert ctl.value == pytest.approx(before)
    # KL 6.6: error 0.1 (inside the clip); mult = 1 + 0.1 * 1000 / 10000 = 1.01
    ctl.update(6.6, n_steps=1000)
    assert ctl.value == pytest.approx(before * 1.01)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.2, target=0.0, horizon=10)


def test_fixed_kl_controller_keeps_its_value():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, n_steps=64) == 0.05
    assert ctl.value == 0.05


def test_assert_finite_names_the_tensor():
    assert_finite("advantages", torch.zeros(2))
    with pytest.raises(ValueError, match="advantages"):
        assert_finite("advantages", torch.tensor([0.0, NAN]))


def test_rloo_advantages_hand_values():
    from rlhf.rl.math import rloo_advantages

    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    adv, ret = rloo_advantages(rewards, mask, group_size=2)
    # sequence returns (masked): 1, 3 | 2, 2 -> leave-one-out advantages -2, +2 | 0, 0
    expected = torch.tensor([[-2.0, -2.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret[:, 0], torch.tensor([1.0, 3.0, 2.0, 2.0]))
    assert ret[0, 2] == 0 and ret[2, 1] == 0
    three, _ = rloo_advantages(torch.tensor([[3.0], [0.0], [0.0]]), torch.ones(3, 1, dtype=torch.bool), 3)
    torch.testing.assert_close(three[:, 0], torch.tensor([3.0, -1.5, -1.5]))
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(rewards, mask, group_size=1)
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(rewards, mask, group_size=3)
