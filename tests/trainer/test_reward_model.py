"""Reward model: Bradley–Terry training finds a known preference, and the checkpoint is what the reward
service loads (with mean/std of the training rewards)."""

from __future__ import annotations

import pytest
import torch

from rlhf.core.chat import tokenize_prompt_response
from rlhf.core.models import load_reward_model, load_tokenizer, reward_forward
from rlhf.reward.checkpoint import read_reward_metadata
from rlhf.trainer.config import RewardModelConfig
from rlhf.trainer.data import load_comparisons
from rlhf.trainer.metrics import read_metrics
from rlhf.trainer.reward_model import bradley_terry_loss_sum, run_reward_model


def _rm_config(tmp_path, model, data_file, **fields) -> RewardModelConfig:
    """A reward-model job on a tiny model and a JSONL file, in tmp_path/rm, without server or progress bar."""
    return RewardModelConfig(
        model=str(model),
        data_file=str(data_file),
        eval_fraction=0.25,
        run_dir=str(tmp_path / "rm"),
        serve=False,
        metrics_port=-1,
        progress=False,
        torch_threads=1,
        **fields,
    )


def test_bradley_terry_loss_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = -torch.nn.functional.logsigmoid(torch.tensor(2.0)) + torch.log(torch.tensor(2.0))
    torch.testing.assert_close(bradley_terry_loss_sum(chosen, rejected), expected)
    torch.testing.assert_close(
        bradley_terry_loss_sum(chosen, rejected, center_coef=0.5), expected + 0.5 * 4.0
    )


def test_reward_model_learns_a_known_preference(tmp_path, tiny_lm_path, preference_jsonl):
    cfg = _rm_config(
        tmp_path,
        tiny_lm_path,
        preference_jsonl,
        max_steps=40,
        batch_size=8,
        learning_rate=3e-3,
        eval_every=20,
        checkpoint_every=0,
    )
    final = run_reward_model(cfg)

    history = read_metrics(tmp_path / "rm")
    assert history[-1]["eval_accuracy"] >= 0.9
    meta = read_reward_metadata(final)
    assert meta["eval_accuracy"] == history[-1]["eval_accuracy"]
    assert meta["reward_std"] > 0

    # the reward service's view: a held-out chosen response outscores its rejected one
    model, tok = load_reward_model(final), load_tokenizer(final)
    pairs = load_comparisons(cfg).eval
    wins, scores = 0, []
    for pair in pairs:
        rows = []
        for response in (pair.chosen, pair.rejected):
            p, r = tokenize_prompt_response(
                tok, pair.prompt if isinstance(pair.prompt, str) else list(pair.prompt), response
            )
            rows.append(torch.tensor([p + r]))
        with torch.no_grad():
            rc, rr = (reward_forward(model, ids, torch.ones_like(ids)).item() for ids in rows)
        wins += rc > rr
        scores += [rc, rr]
    assert wins / len(pairs) >= 0.9
    # mean/std are those of the training responses, so held-out scores of the same kind sit near them
    assert abs(sum(scores) / len(scores) - meta["reward_mean"]) < 2 * meta["reward_std"]


def test_top_layers_from_cached_features_learn_and_leave_the_rest_untouched(
    tmp_path, tiny_lm_path, preference_jsonl
):
    """trainable_layers=1: the lower layer and embeddings keep the starting weights bit for bit, the top layer
    and head learn the preference, and the cached path scores exactly as the saved full model does."""
    from rlhf.core.models import init_reward_model_from_causal_lm

    cfg = _rm_config(
        tmp_path,
        tiny_lm_path,
        preference_jsonl,
        max_steps=40,
        batch_size=8,
        learning_rate=3e-3,
        head_learning_rate=1e-2,
        trainable_layers=1,
        eval_every=0,
        checkpoint_every=0,
    )
    final = run_reward_model(cfg)
    assert read_metrics(tmp_path / "rm")[-1]["eval_accuracy"] >= 0.9
    assert read_reward_metadata(final)["trainable_layers"] == 1

    start, _ = init_reward_model_from_causal_lm(tiny_lm_path)
    trained = load_reward_model(final)
    before, after = start.state_dict(), trained.state_dict()
    frozen = [k for k in before if "embed_tokens" in k or ".layers.0." in k]
    moved = [k for k in before if ".layers.1." in k and k.endswith("weight")]
    assert frozen and moved
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in moved)


def test_a_stop_during_the_feature_pass_ends_the_job_there(
    tmp_path, tiny_lm_path, preference_jsonl, monkeypatch
):
    """SIGTERM while the frozen layers' features are computed (minutes for a real model on a CPU): the job
    stops after the current batch, before any step, instead of finishing the pass first."""
    import signal

    from rlhf.trainer import reward_features as rm
    from rlhf.trainer.job import JobStopped

    calls = []
    lower = rm.FeatureCache._lower

    def lower_then_sigterm(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)  # the job's handler: stop requested
        return lower(self, *args, **kwargs)

    monkeypatch.setattr(rm.FeatureCache, "_lower", lower_then_sigterm)
    cfg = _rm_config(
        tmp_path,
        tiny_lm_path,
        preference_jsonl,
        max_steps=5,
        batch_size=8,
        eval_batch_size=2,
        trainable_layers=1,
        eval_every=0,
        checkpoint_every=0,
    )
    with pytest.raises(JobStopped) as info:
        run_reward_model(cfg)
    assert info.value.step == 0 and "SIGTERM" in str(info.value)
    # the pass has ~100 batches of 2; it ended after the first (a prefix batch and its suffixes' batch)
    assert len(calls) <= 2
    assert not (tmp_path / "rm" / "final").exists()


def test_cached_path_matches_the_full_model(tiny_lm_path):
    from rlhf.core.models import init_reward_model_from_causal_lm
    from rlhf.trainer.reward_features import FeatureCache, freeze_lower_part
    from rlhf.trainer.reward_model import RewardScorer, check_cache_exact

    model, tok = init_reward_model_from_causal_lm(tiny_lm_path)
    model.eval()
    sequences = [sum(tokenize_prompt_response(tok, f"prompt {i}", "word " * (i + 1)), []) for i in range(6)]
    split = freeze_lower_part(model, 1)
    cache = FeatureCache(model, split, sequences, tok.pad_token_id, batch_size=4)
    scorer = RewardScorer(model, sequences, tok.pad_token_id, cache)
    assert check_cache_exact(model, scorer, list(range(6)), tolerance=1e-5) <= 1e-4
    # padding in a batch of different lengths does not change a sequence's score
    with torch.no_grad():
        alone = [float(scorer(torch.tensor([i]))) for i in range(6)]
        together = scorer(torch.tensor(list(range(6)))).tolist()
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) < 1e-4


def test_shared_prefix_groups_cut_sorted_neighbours_where_most_tokens_are_saved():
    from rlhf.trainer.reward_features import shared_prefix_groups

    p = list(range(100, 120))  # 20 shared tokens
    sequences = [
        p + [1, 2],  # 0
        [7] * 30,  # 1: shares nothing
        p + [3],  # 2
        p[:12] + [9, 9, 9],  # 3: shares 12 tokens with the others
        p + [1, 2, 5, 6],  # 4: starts with sequence 0
        p[:12] + [9, 9, 8],  # 5
    ]
    groups, singles = shared_prefix_groups(sequences, min_prefix=8)
    # the two 12-token sharers group on their own (14 tokens: 12 shared + [9, 9]) rather than joining the
    # 20-token group at a 12-token prefix
    assert sorted((length, sorted(members)) for length, members in groups) == [(14, [3, 5]), (20, [0, 2, 4])]
    assert singles == [1]
    # a group's prefix leaves every member at least one token of its own
    groups, singles = shared_prefix_groups([p, p + [1], p + [1, 2]], min_prefix=8)
    assert groups == [(19, [0, 1, 2])] and singles == []
    # below min_prefix: no group
    assert shared_prefix_groups([p[:5] + [1], p[:5] + [2]], min_prefix=8) == ([], [0, 1])


def test_prefix_sharing_feature_cache_equals_the_full_model(tmp_path):
    """Features from shared prefixes' KV caches are the hidden states of the full model run on each sequence
    alone: prefixes of different lengths, a sequence that is the prefix of another, single-member groups,
    padding within the prefix and suffix batches, suffix batches split by batch_size."""
    from rlhf.core.models import init_reward_model_from_causal_lm, make_tiny_causal_lm
    from rlhf.trainer.reward_features import FeatureCache, freeze_lower_part, shared_prefix_groups
    from rlhf.trainer.reward_model import RewardScorer, check_cache_exact

    path = make_tiny_causal_lm(tmp_path / "lm", num_hidden_layers=4)
    model, tok = init_reward_model_from_causal_lm(path)
    model.eval()
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(5, len(tok), (n,), generator=g).tolist()

    long_prompt, short_prompt = tokens(40), tokens(9)
    sequences = [long_prompt + tokens(k) for k in (1, 3, 7, 12, 2)]
    sequences += [sequences[1] + tokens(6)]  # sequence 1 is a prefix of this one
    sequences += [short_prompt + tokens(k) for k in (4, 20, 1)]
    sequences += [tokens(15), tokens(3), long_prompt[:5] + tokens(10)]  # no shared prefix worth a group
    groups, singles = shared_prefix_groups(sequences)
    assert {len(members) for _, members in groups} == {6, 3}
    assert sorted(singles) == [9, 10, 11]

    split = freeze_lower_part(model, 2)
    cache = FeatureCache(model, split, sequences, tok.pad_token_id, batch_size=4)
    with torch.no_grad():
        for i, seq in enumerate(sequences):
            ids = torch.tensor([seq])
            out = model.base_model(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
            )
            expected = out.hidden_states[split][0]
            assert cache.features[i].shape == expected.shape
            torch.testing.assert_close(cache.features[i], expected, atol=1e-5, rtol=1e-5)
    scorer = RewardScorer(model, sequences, tok.pad_token_id, cache)
    assert check_cache_exact(model, scorer, list(range(len(sequences))), tolerance=1e-5) <= 1e-4


class _TableScorer(torch.nn.Module):
    """A score per sequence index, recording the rows of each call."""

    def __init__(self, n):
        super().__init__()
        self.table = torch.nn.Parameter(torch.linspace(-1.0, 1.0, n))
        self.calls = []

    def forward(self, rows):
        self.calls.append(rows.tolist())
        return self.table[rows] * 2.0


def test_score_pairs_scores_each_distinct_sequence_once_with_the_same_loss_and_gradients():
    from rlhf.trainer.reward_model import score_pairs

    pairs = [(0, 1), (0, 2), (3, 1), (0, 1), (2, 3)]
    scorer = _TableScorer(5)
    chosen, rejected = score_pairs(scorer, pairs)
    assert scorer.calls == [[0, 1, 2, 3]]
    bradley_terry_loss_sum(chosen, rejected, center_coef=0.1).backward()
    deduplicated = scorer.table.grad.clone()

    reference = _TableScorer(5)
    rewards = reference(torch.tensor([c for c, _ in pairs] + [r for _, r in pairs]))
    ref_chosen, ref_rejected = rewards[: len(pairs)], rewards[len(pairs) :]
    torch.testing.assert_close(chosen, ref_chosen)
    torch.testing.assert_close(rejected, ref_rejected)
    bradley_terry_loss_sum(ref_chosen, ref_rejected, center_coef=0.1).backward()
    torch.testing.assert_close(deduplicated, reference.table.grad)


def _prompt_pairs(prompts: int, replies: int) -> tuple[list[tuple[int, int]], list[int]]:
    """All reply pairs of each prompt (reply indices numbered per prompt) and the prompt id of each pair."""
    import itertools

    pairs, groups = [], []
    for p in range(prompts):
        for a, b in itertools.combinations(range(replies), 2):
            pairs.append((p * replies + a, p * replies + b))
            groups.append(p)
    return pairs, groups


def test_group_by_prompt_batches_keep_a_prompts_pairs_together_and_are_deterministic():
    from rlhf.trainer.loop import StepPlan, batch_indices

    pairs, groups = _prompt_pairs(prompts=30, replies=8)  # 28 pairs per prompt
    # mix the prompts' pairs up, as a snapshot lists them
    shuffle = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(5)).tolist()
    pairs, groups = [pairs[i] for i in shuffle], [groups[i] for i in shuffle]
    plan = StepPlan(steps_per_epoch=len(pairs) // 32, total_steps=3 * (len(pairs) // 32), batch_size=32)

    def distinct_sequences(batch):
        return len({row for i in batch for row in pairs[i]})

    for epoch in range(2):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        batches = [batch_indices(plan, s, len(pairs), 7, groups) for s in steps]
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == plan.steps_per_epoch * 32  # each pair at most once per epoch
        # a batch holds the pairs of one or two prompts: at most 16 sequences instead of 64
        assert all(len({groups[i] for i in b}) <= 2 for b in batches)
        assert max(distinct_sequences(b) for b in batches) <= 16
        shuffled = [batch_indices(plan, s, len(pairs), 7) for s in steps]
        assert min(distinct_sequences(b) for b in shuffled) > 40
        # a prompt's pairs are neighbours in the epoch's order
        order = [groups[i] for i in seen]
        assert sum(a != b for a, b in zip(order, order[1:], strict=False)) == len(set(order)) - 1

    # the whole epoch (the last partial batch included) covers every pair once
    full = StepPlan(steps_per_epoch=1, total_steps=1, batch_size=len(pairs))
    assert sorted(batch_indices(full, 0, len(pairs), 7, groups)) == list(range(len(pairs)))
    # deterministic given (seed, epoch, step); another epoch or seed orders the prompts differently
    assert batch_indices(plan, 3, len(pairs), 7, groups) == batch_indices(
        plan, 3, len(pairs), 7, list(groups)
    )
    assert batch_indices(plan, 0, len(pairs), 7, groups) != batch_indices(
        plan, plan.steps_per_epoch, len(pairs), 7, groups
    )
    assert batch_indices(plan, 0, len(pairs), 7, groups) != batch_indices(plan, 0, len(pairs), 8, groups)


def test_group_by_prompt_is_a_flag_and_a_reward_model_learns_with_it(tmp_path, tiny_lm_path):
    import argparse
    import json

    import pytest

    from rlhf.core.config import add_config_arguments, config_from_args
    from rlhf.core.errors import FailedPrecondition
    from rlhf.trainer.reward_model import prompt_groups

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RewardModelConfig)
    assert config_from_args(RewardModelConfig, parser.parse_args(["--group-by-prompt"])).group_by_prompt
    assert not config_from_args(RewardModelConfig, parser.parse_args([])).group_by_prompt

    rows = []
    for p in range(24):  # 4 pairs per prompt: each of 2 good replies against each of 2 bad ones
        for good in ("wonderful", "great"):
            for bad in ("terrible", "awful"):
                rows.append(
                    {"prompt": f"Tell me about thing {p}", "chosen": f"It is {good}.", "rejected": bad}
                )
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _rm_config(
        tmp_path,
        tiny_lm_path,
        data,
        max_steps=30,
        batch_size=8,
        learning_rate=3e-3,
        head_learning_rate=1e-2,
        trainable_layers=1,
        group_by_prompt=True,
        eval_every=0,
        checkpoint_every=15,
    )
    groups = prompt_groups(load_comparisons(cfg).train)
    assert len(groups) > len(set(groups)) >= 2
    run_reward_model(cfg)
    assert read_metrics(tmp_path / "rm")[-1]["eval_accuracy"] >= 0.9
    # resuming with the other data order is refused
    with pytest.raises(FailedPrecondition, match="group_by_prompt"):
        run_reward_model(cfg.model_copy(update={"group_by_prompt": False, "resume": True}))
