"""The demo's built-in task: a shipped prompt set and a hidden, documented gold score for replies.

Prompts: ``data/prompts.jsonl`` (written by ``make_prompts.py``), several hundred short requests that invite a
reply (reviews, messages, stories, advice), with a fixed train/eval split.

The gold score is what the simulated people prefer and what the demo measures alignment with. No trainer ever
sees it: labelers turn it into noisy demonstrations, comparisons and ratings, and only those reach the feedback
store. For a response ``r`` (``finished`` = it ended with the end-of-turn token rather than the length limit)::

    words       = the word tokens of r (regex \\w+)
    if r has no word:                       gold = -2                      (empty reply)
    sentiment   = VADER compound(r)                                        in [-1, 1], the positive tone
    repetition  = 1 - distinct word-and-punctuation bigrams / all bigrams  (0 for fewer than 4 tokens)
    gold = sentiment
         - 2.0  * max(0, repetition - 0.2)                                 degenerate loops
         - 0.5  * [not finished]                                           cut off by the length limit
         - 0.02 * max(0, len(words) - 50), at most 1.0                     far too long
    gold = max(gold, -2)

So a reply scores high when it is warm and positive, says things once, ends on its own and stays short: a
reply a person would also pick. Its range is [-2, 1].
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from rlhf.v1 import common_pb2

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.jsonl"
SPLITS = ("train", "eval", "all")

_WORD = re.compile(r"\w+", re.UNICODE)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def load_prompts(split: str = "train") -> list[dict]:
    """The shipped prompts of ``split`` ("train", "eval" or "all") as dicts {"id", "prompt", "category", "split"},
    in the file's fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    rows = _all_prompts()
    return [dict(r) for r in rows if split == "all" or r["split"] == split]


@lru_cache(maxsize=1)
def _all_prompts() -> tuple[dict, ...]:
    with open(PROMPTS_FILE, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


@dataclass(frozen=True)
class GoldConfig:
    """The constants of the gold score (see the module docstring)."""

    empty_score: float = -2.0
    repetition_threshold: float = 0.2
    repetition_weight: float = 2.0
    cutoff_penalty: float = 0.5
    max_words: int = 50
    length_penalty_per_word: float = 0.02
    max_length_penalty: float = 1.0
    min_score: float = -2.0


GOLD = GoldConfig()


@dataclass(frozen=True)
class GoldBreakdown:
    """One response's gold score and its parts."""

    score: float
    sentiment: float
    repetition: float
    repetition_penalty: float
    cutoff_penalty: float
    length_penalty: float
    words: int
    empty: bool
    finished: bool

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound sentiment of ``text``, in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def repetition(text: str) -> float:
    """Share of repeated bigrams over word and punctuation tokens (0 = no bigram twice; ~1 = one loop)."""
    tokens = [t.lower() for t in _TOKEN.findall(text)]
    if len(tokens) < 4:
        return 0.0
    bigrams = list(zip(tokens, tokens[1:], strict=False))
    return 1.0 - len(set(bigrams)) / len(bigrams)


def gold_breakdown(response: str, *, finished: bool = True, config: GoldConfig = GOLD) -> GoldBreakdown:
    """The gold score of ``response`` with each of its terms."""
    return _gold_breakdown(response, bool(finished), config)


@lru_cache(maxsize=65536)
def _gold_breakdown(response: str, finished: bool, config: GoldConfig) -> GoldBreakdown:
    words = _WORD.findall(response)
    if not words:
        return GoldBreakdown(
            score=config.empty_score,
            sentiment=0.0,
            repetition=0.0,
            repetition_penalty=0.0,
            cutoff_penalty=0.0 if finished else config.cutoff_penalty,
            length_penalty=0.0,
            words=0,
            empty=True,
            finished=finished,
        )
    tone = sentiment(response)
    rep = repetition(response)
    rep_penalty = config.repetition_weight * max(0.0, rep - config.repetition_threshold)
    cut_penalty = 0.0 if finished else config.cutoff_penalty
    len_penalty = min(
        config.max_length_penalty, config.length_penalty_per_word * max(0, len(words) - config.max_words)
    )
    score = max(config.min_score, tone - rep_penalty - cut_penalty - len_penalty)
    return GoldBreakdown(
        score=score,
        sentiment=tone,
        repetition=rep,
        repetition_penalty=rep_penalty,
        cutoff_penalty=cut_penalty,
        length_penalty=len_penalty,
        words=len(words),
        empty=False,
        finished=finished,
    )


def gold_score(response: str, *, finished: bool = True, config: GoldConfig = GOLD) -> float:
    """The hidden gold score of one response, in [-2, 1] (higher is better)."""
    return gold_breakdown(response, finished=finished, config=config).score


def gold_scores(
    responses: Sequence[str], finished: Sequence[bool] | None = None, config: GoldConfig = GOLD
) -> list[float]:
    flags = list(finished) if finished is not None else [True] * len(responses)
    return [gold_score(r, finished=f, config=config) for r, f in zip(responses, flags, strict=True)]


def sample_finished(sample) -> bool:
    """Whether a generation ``Sample`` ended on its own (end-of-turn token or a stop string), not the length cap."""
    return sample.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_STOP_STRING)
