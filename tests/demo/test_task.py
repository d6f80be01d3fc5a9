"""The demo task: the shipped prompts and the gold score."""

from __future__ import annotations

import pytest

from rlhf.demo import make_prompts
from rlhf.demo.task import GOLD, gold_breakdown, gold_score, load_prompts, repetition, sentiment


def test_shipped_prompts_match_the_generator():
    assert make_prompts.main(["--check"]) == 0


def test_prompts_split_is_fixed_disjoint_and_covers_every_category():
    train, evals, everything = load_prompts("train"), load_prompts("eval"), load_prompts("all")
    assert len(everything) >= 300
    assert len(train) + len(evals) == len(everything)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in evals}
    assert 0.1 < len(evals) / len(everything) < 0.3
    for split in (train, evals):
        assert {p["category"] for p in split} == {"review", "message", "story", "advice"}
    assert len({p["id"] for p in everything}) == len(everything)
    assert load_prompts("eval") == evals  # same order every time


def test_load_prompts_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_prompts("test")


def test_positive_reply_beats_neutral_beats_negative():
    positive = "What a lovely place! The staff were kind and the coffee was wonderful."
    neutral = "The shop is on the corner. It opens at eight."
    negative = "Awful place. The staff were rude and the coffee was terrible."
    assert gold_score(positive) > gold_score(neutral) > gold_score(negative)
    assert gold_score(positive) == pytest.approx(sentiment(positive))  # no penalty applies


def test_empty_reply_gets_the_floor():
    for text in ("", "   ", "!!! ..."):
        b = gold_breakdown(text)
        assert b.empty and b.score == GOLD.empty_score


def test_cut_off_reply_is_penalised_by_the_constant():
    text = "I really loved the little hotel, the view was beautiful and"
    assert gold_score(text, finished=True) - gold_score(text, finished=False) == pytest.approx(
        GOLD.cutoff_penalty
    )


def test_degenerate_repetition_is_penalised_below_a_plain_reply():
    loop = "great great great great great great great great great great great great"
    assert repetition(loop) > 0.9
    plain = "The hotel was great and the staff were friendly."
    assert repetition(plain) == 0.0
    b = gold_breakdown(loop)
    assert b.repetition_penalty == pytest.approx(
        GOLD.repetition_weight * (b.repetition - GOLD.repetition_threshold)
    )
    assert gold_score(loop) < 0 < gold_score(plain)


def test_far_too_long_reply_loses_per_extra_word_up_to_the_cap():
    words = [f"w{i}" for i in range(GOLD.max_words + 10)]
    b = gold_breakdown(" ".join(words))
    assert b.length_penalty == pytest.approx(10 * GOLD.length_penalty_per_word)
    very_long = gold_breakdown(" ".join(f"w{i}" for i in range(GOLD.max_words + 500)))
    assert very_long.length_penalty == GOLD.max_length_penalty
    assert gold_breakdown(" ".join(words[: GOLD.max_words])).length_penalty == 0.0


def test_gold_score_stays_in_its_documented_range():
    texts = [
        "",
        "no no no no no no no no no no no no no no no no",
        "Terrible horrible awful " * 40,
        "Thank you so much, I love it! Wonderful!",
    ]
    for text in texts:
        for finished in (True, False):
            assert -2.0 <= gold_score(text, finished=finished) <= 1.0
