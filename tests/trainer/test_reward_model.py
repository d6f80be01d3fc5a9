"""Reward model: Bradley–Terry training finds a known preference, and the checkpoint is what the reward
service loads (with mean/std of the training rewards)."""

from __future__ import annotations

import torch

from rlhf.core.chat import tokenize_prompt_response
from rlhf.core.models import load_reward_model, load_tokenizer, reward_forward
from rlhf.reward.checkpoint import read_reward_metadata
from rlhf.trainer.config import RewardModelConfig
from rlhf.trainer.data import load_comparisons
from rlhf.trainer.job import read_metrics
from rlhf.trainer.reward_model import bradley_terry_loss_sum, run_reward_model


def test_bradley_terry_loss_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = -torch.nn.functional.logsigmoid(torch.tensor(2.0)) + torch.log(torch.tensor(2.0))
    torch.testing.assert_close(bradley_terry_loss_sum(chosen, rejected), expected)
    torch.testing.assert_close(
        bradley_terry_loss_sum(chosen, rejected, center_coef=0.5), expected + 0.5 * 4.0
    )


def test_reward_model_learns_a_known_preference(tmp_path, tiny_lm_path, preference_jsonl):
    cfg = RewardModelConfig(
        model=str(tiny_lm_path),
        data_file=preference_jsonl,
        eval_fraction=0.25,
        run_dir=str(tmp_path / "rm"),
        serve=False,
        metrics_port=-1,
        progress=False,
        max_steps=40,
        batch_size=8,
        learning_rate=3e-3,
        eval_every=20,
        checkpoint_every=0,
        torch_threads=1,
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

    cfg = RewardModelConfig(
        model=str(tiny_lm_path),
        data_file=preference_jsonl,
        eval_fraction=0.25,
        run_dir=str(tmp_path / "rm"),
        serve=False,
        metrics_port=-1,
        progress=False,
        max_steps=40,
        batch_size=8,
        learning_rate=3e-3,
        head_learning_rate=1e-2,
        trainable_layers=1,
        eval_every=0,
        checkpoint_every=0,
        torch_threads=1,
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


def test_cached_path_matches_the_full_model(tiny_lm_path):
    from rlhf.core.models import init_reward_model_from_causal_lm
    from rlhf.trainer.reward_model import FeatureCache, RewardScorer, check_cache_exact, freeze_lower_part

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
