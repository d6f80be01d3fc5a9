"""Training data: records from a feedback-store snapshot or TRL JSONL, comparisons and ratings as pairs,
response-only SFT labels."""

from __future__ import annotations

import pytest

from rlhf.core.chat import encode_prompt, encode_response
from rlhf.core.models import load_tokenizer
from rlhf.feedback import records as rec
from rlhf.trainer.config import RewardModelConfig, SFTConfig
from rlhf.trainer.data import (
    Demonstration,
    RawRecord,
    comparison_pairs,
    encode_sft_example,
    load_comparisons,
    load_demonstrations,
    load_prompts,
    ratings_to_comparisons,
)
from rlhf.v1 import feedback_pb2

from .conftest import write_jsonl


def test_ranking_gives_every_ordered_pair_and_chosen_index_one_per_other():
    ranked = rec.make_comparison("p", ["a", "b", "c"], ranking=[2, 0, 1], idempotency_key="k")
    assert comparison_pairs(ranked) == [(2, 0), (2, 1), (0, 1)]
    chosen = rec.make_comparison("p", ["a", "b", "c"], chosen_index=1, idempotency_key="k")
    assert comparison_pairs(chosen) == [(1, 0), (1, 2)]


def test_ratings_of_one_prompt_become_pairs_by_scaled_score():
    def rating(prompt, response, score, scale=(1, 7), split="train"):
        message = rec.make_rating(
            prompt, response, score, scale=scale, idempotency_key=f"{prompt}{response}{score}"
        )
        return RawRecord("rating", message, split)

    ratings = [
        rating("p", "good", 7),
        rating("p", "good", 5),  # averaged with the 7: (1 + 2/3) / 2
        rating("p", "bad", 2),
        rating("p", "ok", 0.5, scale=(0, 1)),  # 0.5 on its own scale
        rating("q", "lonely", 3),  # one response: no pair
        rating("p", "elsewhere", 1, split="eval"),  # other split: not paired with the train ratings
    ]
    pairs = {(split, c.chosen, c.rejected) for split, c in ratings_to_comparisons(ratings)}
    assert pairs == {("train", "good", "bad"), ("train", "good", "ok"), ("train", "ok", "bad")}
    strict = {(c.chosen, c.rejected) for _, c in ratings_to_comparisons(ratings, margin=0.4)}
    assert strict == {("good", "bad")}


def test_jsonl_split_is_stable_and_holds_out_about_eval_fraction(tmp_path, preference_jsonl):
    cfg = RewardModelConfig(data_file=preference_jsonl, eval_fraction=0.25, seed=3)
    first, second = load_comparisons(cfg), load_comparisons(cfg)
    assert first.eval == second.eval and first.train == second.train
    assert len(first) == 160
    assert 20 <= len(first.eval) <= 60
    assert all(c.chosen.endswith("wonderful.") and c.rejected.endswith("terrible.") for c in first.train)
    other = load_comparisons(RewardModelConfig(data_file=preference_jsonl, eval_fraction=0.25, seed=4))
    assert other.eval != first.eval


def test_jsonl_formats_messages_and_explicit_eval_file(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": "2+2?", "completion": "4"},
            {"prompt": "a prompt only"},
        ],
    )
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "3+3?", "completion": "6"}])
    data = load_demonstrations(SFTConfig(data_file=train, eval_data_file=evals))
    assert [(d.prompt, d.response) for d in data.train] == [
        (({"role": "user", "content": "hi"},), "hello"),
        ("2+2?", "4"),
    ]
    assert [(d.prompt, d.response) for d in data.eval] == [("3+3?", "6")]
    prompts = load_prompts(SFTConfig(data_file=train, eval_data_file=evals))
    assert prompts.train == ["a prompt only"] and prompts.eval == []


def test_snapshot_split_comes_from_the_feedback_store(tmp_path):
    from rlhf.feedback.store import FeedbackStore

    url = f"sqlite:///{tmp_path / 'fb.db'}"
    with FeedbackStore(url) as store:
        store.add_demonstrations(
            [
                rec.make_demonstration(f"prompt {i}", f"response {i}", idempotency_key=f"d{i}")
                for i in range(40)
            ]
        )
        store.add_comparisons([rec.make_comparison("p", ["x", "y"], chosen_index=1, idempotency_key="c0")])
        snapshot = store.create_snapshot(feedback_pb2.Snapshot(name="snap-1", eval_fraction=0.3, seed=7))
    cfg = SFTConfig(feedback_database_url=url, snapshot="snap-1")
    data = load_demonstrations(cfg)
    pairs = load_comparisons(cfg)
    assert len(data.train) + len(data.eval) == 40
    assert [(c.chosen, c.rejected) for c in pairs.train + pairs.eval] == [("y", "x")]
    assert len(data.eval) + len(pairs.eval) == snapshot.num_eval > 0
    assert len(data.train) + len(pairs.train) == snapshot.num_train


def test_sft_labels_cover_the_response_and_eos_only(tiny_lm_path):
    tok = load_tokenizer(tiny_lm_path)
    ids, labels = encode_sft_example(tok, Demonstration("Tell a story.", "Once upon a time."), max_length=256)
    prompt_ids = encode_prompt(tok, "Tell a story.")
    response_ids = encode_response(tok, "Once upon a time.")
    assert ids == prompt_ids + response_ids
    assert labels == [-100] * len(prompt_ids) + response_ids
    assert labels[-1] == tok.eos_token_id
    cut_ids, cut_labels = encode_sft_example(
        tok, Demonstration("Tell a story.", "Once upon a time."), len(prompt_ids) + 2
    )
    assert cut_ids == prompt_ids + response_ids[:2] and cut_labels[-2:] == response_ids[:2]
    assert encode_sft_example(tok, Demonstration("Tell a story.", "x"), max_length=len(prompt_ids)) is None


def test_data_file_and_snapshot_are_exclusive():
    with pytest.raises(ValueError, match="data_file"):
        SFTConfig(data_file="x.jsonl", snapshot="s", feedback_target="localhost:1")
