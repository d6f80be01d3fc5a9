"""Simulated people for the demo, behind the same small protocols a real labeling tool would implement.

Three roles, one protocol each (a human front-end implements the same methods and the rest of the demo does
not change):

* :class:`Demonstrator` ``demonstrate(prompt, candidates) -> int``: which candidate to keep as the ideal
  response. The simulated one takes the gold-best of k base-model samples.
* :class:`Comparer` ``compare(prompt, a, b, rng) -> int``: 0 if ``a`` is preferred, 1 if ``b``. The simulated one
  follows Bradley-Terry on the gold score with its own temperature ``T``, and a careless one answers at random
  with probability ``careless``:  P(a) = careless / 2 + (1 - careless) * sigmoid((gold(a) - gold(b)) / T).
* :class:`Rater` ``rate(prompt, candidate, rng) -> float`` on a 1-7 scale: round(4 + 3 * (gold + N(0, sigma))),
  clipped to [1, 7].

The ``collect_*`` functions hand work to labelers and write what they answer into the feedback store through
:class:`rlhf.feedback.client.FeedbackClient` (idempotent keys, so a re-run of the demo does not duplicate
records). Each record keeps the candidates' "finished" flags in its metadata (``"1,0"``), so that the noise
model can be replayed on any stored comparison (:func:`bayes_optimal_accuracy_of_records`).

The Bayes-optimal accuracy is the best agreement with the labelers' answers that *any* reward model can reach:
every labeler here prefers the gold-better response with probability p >= 1/2, so the best prediction is
always the gold-better one, right with probability max(p, 1 - p); averaged over comparisons, that is the
ceiling to hold the reward model's held-out accuracy against.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rlhf.demo.evaluate import win
from rlhf.demo.task import GOLD, GoldConfig, gold_score
from rlhf.feedback import records as rec
from rlhf.v1 import feedback_pb2

RATING_SCALE = (1.0, 7.0)


@dataclass(frozen=True)
class Candidate:
    """A response shown to a labeler: its text, whether it ended on its own, the model version that wrote it."""

    text: str
    finished: bool = True
    model_version: str = ""

    def gold(self, config: GoldConfig = GOLD) -> float:
        return gold_score(self.text, finished=self.finished, config=config)


# ---- the protocols ----------------------------------------------------------------------------------------


@runtime_checkable
class Labeler(Protocol):
    """Anyone who writes feedback: has a stable id and describes itself for the feedback store."""

    id: str

    def describe(self) -> feedback_pb2.Labeler: ...


@runtime_checkable
class Demonstrator(Labeler, Protocol):
    def demonstrate(self, prompt: rec.PromptLike, candidates: Sequence[Candidate]) -> int:
        """Index of the candidate to store as the ideal response to ``prompt``."""
        ...


@runtime_checkable
class Comparer(Labeler, Protocol):
    def compare(self, prompt: rec.PromptLike, a: Candidate, b: Candidate, rng: random.Random) -> int:
        """0 if ``a`` is the better response, 1 if ``b`` is."""
        ...


@runtime_checkable
class Rater(Labeler, Protocol):
    scale: tuple[float, float]

    def rate(self, prompt: rec.PromptLike, candidate: Candidate, rng: random.Random) -> float:
        """A score on ``scale``."""
        ...


# ---- the simulated people ---------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@dataclass
class GoldDemonstrator:
    """Keeps the gold-best candidate (ties: the first)."""

    id: str = "sim-demonstrator"
    config: GoldConfig = GOLD

    def describe(self) -> feedback_pb2.Labeler:
        return feedback_pb2.Labeler(
            id=self.id,
            display_name="simulated demonstrator (gold-best of k)",
            kind="simulated",
            metadata={"policy": "gold-best-of-k"},
        )

    def demonstrate(self, prompt, candidates: Sequence[Candidate]) -> int:
        if not candidates:
            raise ValueError("demonstrate needs at least one candidate")
        scores = [c.gold(self.config) for c in candidates]
        return max(range(len(scores)), key=lambda i: (scores[i], -i))


@dataclass
class BradleyTerryComparer:
    """Prefers ``a`` with probability careless/2 + (1 - careless) * sigmoid((gold(a) - gold(b)) / temperature)."""

    id: str
    temperature: float = 0.2
    careless: float = 0.0
    config: GoldConfig = GOLD

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0.0 <= self.careless <= 1.0:
            raise ValueError("careless must be in [0, 1]")

    def describe(self) -> feedback_pb2.Labeler:
        return feedback_pb2.Labeler(
            id=self.id,
            display_name=f"simulated comparer T={self.temperature:g} careless={self.careless:g}",
            kind="simulated",
            metadata={
                "model": "bradley-terry",
                "temperature": repr(self.temperature),
                "careless": repr(self.careless),
            },
        )

    def prob_first(self, gold_a: float, gold_b: float) -> float:
        """P(this labeler prefers a) given the two gold scores."""
        return self.careless / 2 + (1.0 - self.careless) * sigmoid((gold_a - gold_b) / self.temperature)

    def compare(self, prompt, a: Candidate, b: Candidate, rng: random.Random) -> int:
        p = self.prob_first(a.gold(self.config), b.gold(self.config))
        return 0 if rng.random() < p else 1


@dataclass
class NoisyRater:
    """Rates 1-7: round(4 + 3 * (gold + N(0, sigma))), clipped to the scale."""

    id: str
    sigma: float = 0.2
    config: GoldConfig = GOLD
    scale: tuple[float, float] = RATING_SCALE

    def describe(self) -> feedback_pb2.Labeler:
        return feedback_pb2.Labeler(
            id=self.id,
            display_name=f"simulated rater sigma={self.sigma:g}",
            kind="simulated",
            metadata={"model": "gaussian-rating", "sigma": repr(self.sigma), "scale": "1-7"},
        )

    def expected_rating(self, gold: float) -> float:
        """The rating before noise and rounding."""
        return 4.0 + 3.0 * gold

    def rate(self, prompt, candidate: Candidate, rng: random.Random) -> float:
        latent = candidate.gold(self.config) + rng.gauss(0.0, self.sigma)
        low, high = self.scale
        return float(min(high, max(low, round(self.expected_rating(latent)))))


@dataclass
class LabelerPool:
    """The simulated people of one demo run."""

    demonstrator: Demonstrator
    comparers: list[Comparer]
    raters: list[Rater]

    def all(self) -> list[Labeler]:
        return [self.demonstrator, *self.comparers, *self.raters]

    def by_id(self) -> dict[str, Labeler]:
        return {labeler.id: labeler for labeler in self.all()}


def default_pool(seed: int = 0, n_comparers: int = 8, n_careless: int = 2, n_raters: int = 3) -> LabelerPool:
    """Comparers with temperatures spread over [0.1, 0.4] (each its own), ``n_careless`` of them answering at
    random half the time, and raters with noise sigma in [0.15, 0.4]. Deterministic in ``seed``."""
    rng = random.Random(seed)
    comparers = []
    for i in range(n_comparers):
        temperature = round(0.1 + 0.3 * i / max(1, n_comparers - 1), 3)
        careless = 0.5 if i >= n_comparers - n_careless else 0.0
        comparers.append(
            BradleyTerryComparer(id=f"sim-comparer-{i}", temperature=temperature, careless=careless)
        )
    rng.shuffle(comparers)
    raters = [
        NoisyRater(id=f"sim-rater-{i}", sigma=round(0.15 + 0.25 * i / max(1, n_raters - 1), 3))
        for i in range(n_raters)
    ]
    return LabelerPool(GoldDemonstrator(), comparers, raters)


# ---- writing feedback through the store -------------------------------------------------------------------


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:32]


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else rec.canonical_json(list(prompt))


def _flags(candidates: Iterable[Candidate]) -> str:
    return ",".join("1" if c.finished else "0" for c in candidates)


def register_labelers(client, labelers: Iterable[Labeler]) -> feedback_pb2.WriteResult:
    return client.add_labelers([labeler.describe() for labeler in labelers])


def collect_demonstrations(
    client,
    demonstrator: Demonstrator,
    items: Sequence[tuple[rec.PromptLike, Sequence[Candidate]]],
    *,
    tag: str,
) -> list[feedback_pb2.Demonstration]:
    """Ask ``demonstrator`` for the ideal response of each (prompt, candidates) and store it; returns the records."""
    records = []
    for prompt, all_candidates in items:
        candidates = [c for c in all_candidates if c.text.strip()]  # the store refuses empty responses
        if not candidates:
            continue
        chosen = candidates[demonstrator.demonstrate(prompt, candidates)]
        records.append(
            rec.make_demonstration(
                prompt,
                chosen.text,
                idempotency_key=f"demo:{tag}:dm:{_key(demonstrator.id, _prompt_key(prompt))}",
                labeler_id=demonstrator.id,
                model_version=chosen.model_version,
                metadata={"finished": _flags([chosen]), "candidates": str(len(candidates))},
            )
        )
    if records:
        client.add_demonstrations(records)
    return records


def collect_comparisons(
    client,
    comparers: Sequence[Comparer],
    items: Sequence[tuple[rec.PromptLike, Candidate, Candidate]],
    *,
    tag: str,
    rng: random.Random,
    labelers_per_pair: int = 1,
) -> list[feedback_pb2.Comparison]:
    """Give each (prompt, a, b) to ``labelers_per_pair`` different comparers drawn at random from
    ``comparers`` (each answers on their own, one record each, as several annotators per item); store the
    answers."""
    if not 1 <= labelers_per_pair <= len(comparers):
        raise ValueError(f"labelers_per_pair: must be between 1 and the {len(comparers)} comparers")
    records = []
    for index, (prompt, a, b) in enumerate(items):
        if not (a.text.strip() and b.text.strip()):
            continue  # the store refuses empty responses; nobody is asked to compare an empty reply
        if labelers_per_pair == 1:  # the draw (and key) of one comparer per pair, as before: same runs
            chosen_labelers = [comparers[rng.randrange(len(comparers))]]
        else:
            chosen_labelers = rng.sample(list(comparers), labelers_per_pair)
        key = _key(_prompt_key(prompt), a.text, b.text)
        for labeler in chosen_labelers:
            chosen = labeler.compare(prompt, a, b, rng)
            suffix = "" if labelers_per_pair == 1 else f":{labeler.id}"
            records.append(
                rec.make_comparison(
                    prompt,
                    [a.text, b.text],
                    chosen_index=chosen,
                    idempotency_key=f"demo:{tag}:cmp:{index}:{key}{suffix}",
                    labeler_id=labeler.id,
                    model_versions=[a.model_version, b.model_version],
                    metadata={"finished": _flags([a, b])},
                )
            )
    if records:
        client.add_comparisons(records)
    return records


def collect_ratings(
    client,
    raters: Sequence[Rater],
    items: Sequence[tuple[rec.PromptLike, Candidate]],
    *,
    tag: str,
    rng: random.Random,
) -> list[feedback_pb2.Rating]:
    """Give each (prompt, response) to a rater drawn at random; store the 1-7 scores."""
    records = []
    for index, (prompt, candidate) in enumerate(items):
        if not candidate.text.strip():
            continue  # the store refuses empty responses
        labeler = raters[rng.randrange(len(raters))]
        score = labeler.rate(prompt, candidate, rng)
        records.append(
            rec.make_rating(
                prompt,
                candidate.text,
                score,
                scale=tuple(labeler.scale),
                idempotency_key=f"demo:{tag}:rt:{index}:{_key(_prompt_key(prompt), candidate.text)}",
                labeler_id=labeler.id,
                model_version=candidate.model_version,
                metadata={"finished": _flags([candidate])},
            )
        )
    if records:
        client.add_ratings(records)
    return records


# ---- what the noise allows --------------------------------------------------------------------------------


def bayes_optimal_accuracy(items: Iterable[tuple[BradleyTerryComparer, float, float]]) -> float:
    """Expected accuracy of the best possible predictor of the labelers' choices over (labeler, gold_a, gold_b)
    items: the mean of max(p, 1 - p) with p = labeler.prob_first(gold_a, gold_b)."""
    values = [max(p, 1.0 - p) for p in (lab.prob_first(ga, gb) for lab, ga, gb in items)]
    if not values:
        raise ValueError("bayes_optimal_accuracy needs at least one comparison")
    return sum(values) / len(values)


def _finished_flags(record, n: int) -> list[bool]:
    raw = record.metadata.get("finished", "")
    flags = [f == "1" for f in raw.split(",")] if raw else []
    return flags if len(flags) == n else [True] * n


def _record_golds(record: feedback_pb2.Comparison, config: GoldConfig) -> tuple[float, float]:
    """The gold scores of a two-way comparison's replies (cut-off flags from the record's metadata)."""
    g0, g1 = (
        gold_score(r.text, finished=f, config=config)
        for r, f in zip(record.responses, _finished_flags(record, 2), strict=True)
    )
    return g0, g1


def _label_agrees(golds: tuple[float, float], chosen_index: int) -> float:
    """1 when the chosen reply is the gold-better one, one half on a gold tie, 0 otherwise."""
    g0, g1 = golds
    return 0.5 if g0 == g1 else 1.0 if (g0 > g1) == (chosen_index == 0) else 0.0


def bayes_optimal_accuracy_of_records(
    comparisons: Iterable[feedback_pb2.Comparison], labelers: dict[str, Labeler], config: GoldConfig = GOLD
) -> tuple[float, int]:
    """(Bayes-optimal accuracy, number of comparisons used) over stored two-way comparisons written by the
    simulated Bradley-Terry comparers in ``labelers`` (others are skipped)."""
    items = []
    for record in comparisons:
        labeler = labelers.get(record.labeler_id)
        if not isinstance(labeler, BradleyTerryComparer) or len(record.responses) != 2:
            continue
        items.append((labeler, *_record_golds(record, config)))
    return bayes_optimal_accuracy(items), len(items)


def gold_agreement_of_records(
    comparisons: Iterable[feedback_pb2.Comparison], config: GoldConfig = GOLD
) -> float:
    """Share of stored two-way comparisons whose chosen response is also the gold-better one (ties count 1/2)."""
    values = [
        _label_agrees(_record_golds(record, config), record.chosen_index)
        for record in comparisons
        if len(record.responses) == 2
    ]
    if not values:
        raise ValueError("no two-way comparisons")
    return sum(values) / len(values)


PAIR_KINDS = ("both_finished", "one_cut_off", "both_cut_off")


def pair_kind(record: feedback_pb2.Comparison) -> str:
    """Which of :data:`PAIR_KINDS` a two-way comparison is: how many of its replies the length limit cut off
    (the ``finished`` flags the demo stores in the record's metadata)."""
    return PAIR_KINDS[2 - sum(_finished_flags(record, 2))]


def scored_pair_accuracy(
    comparisons: Sequence[feedback_pb2.Comparison],
    scores: Sequence[tuple[float, float]],
    labelers: dict[str, Labeler],
    config: GoldConfig = GOLD,
) -> dict:
    """How a scorer (``scores[i]``: its scores of comparison i's two replies) does on stored two-way comparisons,
    overall and per :func:`pair_kind`: ``accuracy`` on the labelers' choices (ties 1/2; ``hits`` holds the
    per-comparison values), ``gold_pair_accuracy`` (agreement with the gold order, gold ties 1/2),
    ``bayes_optimal_accuracy`` (None where no simulated comparer judged) and ``label_gold_agreement`` on the
    same comparisons, and ``comparisons``.

    The split shows where a reward model fails: a pair with one cut-off reply differs by the cut-off penalty
    (easy to see), two replies of one prompt that both ran into the limit differ mostly by tone (hard)."""
    if len(comparisons) != len(scores):
        raise ValueError(f"{len(comparisons)} comparisons but {len(scores)} score pairs")
    if not comparisons:
        raise ValueError("scored_pair_accuracy needs at least one comparison")
    hits, agrees, label_agrees, bayes_items, kinds = [], [], [], [], []
    for record, (s0, s1) in zip(comparisons, scores, strict=True):
        if len(record.responses) != 2:
            raise ValueError("scored_pair_accuracy needs two-way comparisons")
        golds = _record_golds(record, config)  # once per record: every figure below reads them
        hits.append(win(s0, s1) if record.chosen_index == 0 else win(s1, s0))
        g0, g1 = golds
        agrees.append(0.5 if g0 == g1 or s0 == s1 else 1.0 if (s0 > s1) == (g0 > g1) else 0.0)
        label_agrees.append(_label_agrees(golds, record.chosen_index))
        labeler = labelers.get(record.labeler_id)
        bayes_items.append((labeler, g0, g1) if isinstance(labeler, BradleyTerryComparer) else None)
        kinds.append(pair_kind(record))

    def summary(rows: list[int]) -> dict:
        items = [bayes_items[i] for i in rows if bayes_items[i] is not None]
        return {
            "comparisons": len(rows),
            "accuracy": sum(hits[i] for i in rows) / len(rows),
            "gold_pair_accuracy": sum(agrees[i] for i in rows) / len(rows),
            "bayes_optimal_accuracy": bayes_optimal_accuracy(items) if items else None,
            "label_gold_agreement": sum(label_agrees[i] for i in rows) / len(rows),
        }

    out = summary(list(range(len(hits))))
    out["hits"] = hits
    out["by_kind"] = {
        kind: summary(rows) for kind in PAIR_KINDS if (rows := [i for i, k in enumerate(kinds) if k == kind])
    }
    return out
