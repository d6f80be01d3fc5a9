"""Evaluation math: bootstrap CIs, win rates, KL per response, distinct-n, reference logprobs."""

from __future__ import annotations

import math

import pytest

from rlhf.demo.evaluate import (
    bootstrap_mean_ci,
    distinct_n,
    group_means,
    kl_per_response,
    pearson,
    reference_logprobs,
    spearman,
    summarize,
    win_rate,
    win_rate_by,
    win_rate_ci,
)


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_more_data():
    small = [0.0, 1.0] * 10
    large = [0.0, 1.0] * 500
    m, lo, hi = bootstrap_mean_ci(small, seed=1)
    assert m == 0.5 and lo < 0.5 < hi
    m2, lo2, hi2 = bootstrap_mean_ci(large, seed=1)
    assert hi2 - lo2 < (hi - lo) / 3
    # normal approximation: half-width ~ 1.96 * 0.5 / sqrt(n)
    assert (hi2 - lo2) / 2 == pytest.approx(1.96 * 0.5 / math.sqrt(1000), rel=0.25)
    assert bootstrap_mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    rate, lo, hi = win_rate_ci([1.0] * 30, [0.0] * 30)
    assert rate == lo == hi == 1.0
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_win_rate_with_several_samples_meets_every_sample_of_the_prompt():
    # prompt 0: a=[3, 1] vs b=[2, 2] -> 3>2 twice, 1<2 twice: 0.5; prompt 1: a=[5, 5] vs b=[5, 0] -> 0.5+1+0.5+1: 0.75
    a, b = [3, 1, 5, 5], [2, 2, 5, 0]
    assert win_rate(a, b, group=2) == pytest.approx((0.5 + 0.75) / 2)
    # pairing index by index instead would give (1 + 0 + 0.5 + 1) / 4
    assert win_rate(a, b) == pytest.approx(2.5 / 4)
    rate, lo, hi = win_rate_ci(a, b, group=2)
    assert rate == pytest.approx(0.625) and lo >= 0.5 and hi <= 0.75  # resamples the two prompts' shares
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], group=2)


def test_win_rate_by_splits_the_pairs_by_a_label_of_the_b_sample():
    # prompt 0: a=[1, 0] vs b=[0.5 finished, 0.5 cut]; prompt 1: a=[2, 2] vs b=[3 finished, 1 cut]
    a, b = [1, 0, 2, 2], [0.5, 0.5, 3, 1]
    split = win_rate_by(a, b, ["finished", "cut", "finished", "cut"], group=2)
    assert split == {"cut": {"rate": 0.75, "pairs": 4}, "finished": {"rate": 0.25, "pairs": 4}}
    # with one label for all, the pooled pairs are the win rate's pairs (equal-sized prompts: same rate)
    assert win_rate_by(a, b, ["x"] * 4, group=2)["x"]["rate"] == pytest.approx(win_rate(a, b, group=2))
    with pytest.raises(ValueError):
        win_rate_by(a, b, ["x"] * 3, group=2)


def test_gold_interval_resamples_prompts_not_samples():
    # two samples per prompt, identical within a prompt: the prompt-level interval equals the one of the means
    gold = [0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.2]
    grouped = summarize("p", ["x"] * 8, gold, [1] * 8, [True] * 8, group=2).summary
    means = bootstrap_mean_ci([0.0, 1.0, 0.5, 0.2])
    assert grouped["gold_mean"] == pytest.approx(means[0])
    assert (grouped["gold_ci_low"], grouped["gold_ci_high"]) == pytest.approx(means[1:])
    assert grouped["samples_per_prompt"] == 2
    assert group_means([1.0, 3.0, 5.0, 7.0], 2) == [2.0, 6.0]


def test_kl_per_response_sums_token_differences():
    policy = [[-0.1, -0.2, -0.3], [-1.0]]
    ref = [[-0.5, -0.2, -0.1], [-3.0]]
    assert kl_per_response(policy, ref) == pytest.approx([0.4 + 0.0 - 0.2, 2.0])
    with pytest.raises(ValueError, match="response 0"):
        kl_per_response([[-0.1]], [[-0.1, -0.2]])


def test_kl_estimate_converges_to_the_analytic_kl():
    # sampling from a categorical pi, the mean of log pi(y) - log q(y) is KL(pi || q)
    import random

    pi = [0.7, 0.2, 0.1]
    q = [0.4, 0.4, 0.2]
    rng = random.Random(0)
    ys = rng.choices(range(3), weights=pi, k=20000)
    kls = kl_per_response([[math.log(pi[y])] for y in ys], [[math.log(q[y])] for y in ys])
    analytic = sum(p * math.log(p / r) for p, r in zip(pi, q, strict=True))
    assert sum(kls) / len(kls) == pytest.approx(analytic, abs=0.01)


def test_distinct_n_detects_collapse():
    varied = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn"]
    collapsed = ["great great great"] * 3
    assert distinct_n(varied, 1) > distinct_n(collapsed, 1)
    assert distinct_n(collapsed, 2) == pytest.approx(1 / 6)
    assert distinct_n(["a b c d"], 2) == 1.0
    assert distinct_n([""], 2) == 0.0


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 1, 1]) == 0.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_summarize_reports_gold_lengths_distinct_and_kl():
    ev = summarize(
        "PPO",
        ["I love it!", "Great day."],
        [0.6, 0.8],
        [4, 3],
        [True, False],
        kl=[1.0, 3.0],
        rm_scores=[0.1, 0.3],
    )
    s = ev.summary
    assert s["gold_mean"] == pytest.approx(0.7)
    assert s["gold_ci_low"] <= 0.7 <= s["gold_ci_high"]
    assert s["kl_mean"] == pytest.approx(2.0)
    assert s["finished_rate"] == 0.5
    assert s["mean_words"] == pytest.approx(2.5)
    assert s["rm_mean"] == pytest.approx(0.2)
    assert ev.to_dict()["name"] == "PPO"


def test_reference_logprobs_match_a_direct_forward_and_ignore_padding(tiny_lm_path):
    import torch

    from rlhf.core.models import load_causal_lm

    model = load_causal_lm(tiny_lm_path)
    prompts = [[5, 6, 7, 8], [9, 10]]
    responses = [[11, 12], [13, 14, 15, 16]]
    batched = reference_logprobs(model, prompts, responses, temperature=0.7, batch_size=2)
    for p, r, got in zip(prompts, responses, batched, strict=True):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0] / 0.7, dim=-1)
        expected = [logp[len(p) - 1 + t, r[t]].item() for t in range(len(r))]
        assert got == pytest.approx(expected, abs=1e-4)
    # the same policy as reference: KL is exactly zero per response
    assert kl_per_response(batched, reference_logprobs(model, prompts, responses, temperature=0.7)) == [
        0.0,
        0.0,
    ]
