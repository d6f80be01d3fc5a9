"""Simulated labelers: their noise statistics match their model, and what they answer lands in the store."""

from __future__ import annotations

import math
import random

import pytest

from rlhf.demo.labelers import (
    BradleyTerryComparer,
    Candidate,
    Comparer,
    Demonstrator,
    GoldDemonstrator,
    NoisyRater,
    Rater,
    bayes_optimal_accuracy,
    bayes_optimal_accuracy_of_records,
    collect_comparisons,
    collect_demonstrations,
    collect_ratings,
    default_pool,
    gold_agreement_of_records,
    pair_kind,
    register_labelers,
    scored_pair_accuracy,
)
from rlhf.demo.task import gold_score
from rlhf.feedback import records as rec
from rlhf.v1 import feedback_pb2

GOOD = Candidate("What a wonderful little cafe, the staff were lovely and the cake was great!")
OK = Candidate("The cafe is fine. The cake was okay.")
BAD = Candidate("A terrible cafe with rude staff and stale, awful cake.")
CUT = Candidate("What a wonderful little cafe, the staff were lovely and", finished=False)


def test_simulated_labelers_implement_the_protocols():
    pool = default_pool(seed=1)
    assert isinstance(pool.demonstrator, Demonstrator)
    assert all(isinstance(c, Comparer) for c in pool.comparers)
    assert all(isinstance(r, Rater) for r in pool.raters)
    assert len(pool.by_id()) == len(pool.all())  # ids are unique


def test_default_pool_has_distinct_temperatures_and_a_few_careless_comparers():
    pool = default_pool(seed=0, n_comparers=8, n_careless=2)
    temps = [c.temperature for c in pool.comparers]
    assert len(set(temps)) == 8
    assert sum(c.careless > 0 for c in pool.comparers) == 2
    assert default_pool(seed=0).comparers == pool.comparers  # deterministic


def test_demonstrator_keeps_the_gold_best_candidate():
    d = GoldDemonstrator()
    assert d.demonstrate("Review a cafe.", [BAD, OK, GOOD, CUT]) == 2
    assert d.demonstrate("Review a cafe.", [OK]) == 0
    with pytest.raises(ValueError):
        d.demonstrate("Review a cafe.", [])


def test_bradley_terry_probability_follows_the_formula():
    c = BradleyTerryComparer("c", temperature=0.25, careless=0.2)
    assert c.prob_first(0.5, 0.5) == pytest.approx(0.5)
    expected = 0.1 + 0.8 / (1 + math.exp(-(0.9 - 0.4) / 0.25))
    assert c.prob_first(0.9, 0.4) == pytest.approx(expected)
    assert c.prob_first(0.4, 0.9) == pytest.approx(1 - expected)
    with pytest.raises(ValueError):
        BradleyTerryComparer("x", temperature=0.0)


@pytest.mark.parametrize("temperature,careless", [(0.1, 0.0), (0.3, 0.0), (0.2, 0.5), (1.0, 0.0)])
def test_comparer_choice_frequency_matches_its_noise_model(temperature, careless):
    c = BradleyTerryComparer("c", temperature=temperature, careless=careless)
    rng = random.Random(7)
    n = 4000
    first = sum(c.compare("p", OK, BAD, rng) == 0 for _ in range(n)) / n
    p = c.prob_first(OK.gold(), BAD.gold())
    assert first == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-3)


def test_colder_comparer_agrees_with_gold_more_often():
    rng = random.Random(3)
    pairs = [(OK, GOOD), (GOOD, CUT), (BAD, OK), (CUT, OK)]

    def agreement(c):
        hits = 0
        for _ in range(1500):
            for a, b in pairs:
                chosen = c.compare("p", a, b, rng)
                hits += (chosen == 0) == (a.gold() > b.gold())
        return hits / (1500 * len(pairs))

    careful = agreement(BradleyTerryComparer("a", temperature=0.05))
    noisy = agreement(BradleyTerryComparer("b", temperature=0.6))
    careless = agreement(BradleyTerryComparer("c", temperature=0.05, careless=0.8))
    assert careful > noisy > 0.5
    assert careful > careless > 0.5


def test_bayes_optimal_accuracy_is_mean_of_max_p():
    c1 = BradleyTerryComparer("a", temperature=0.2)
    c2 = BradleyTerryComparer("b", temperature=0.5, careless=0.5)
    items = [(c1, 0.8, 0.2), (c2, 0.1, 0.6), (c1, 0.3, 0.3)]
    expected = (
        max(c1.prob_first(0.8, 0.2), 1 - c1.prob_first(0.8, 0.2))
        + max(c2.prob_first(0.1, 0.6), 1 - c2.prob_first(0.1, 0.6))
        + 0.5
    ) / 3
    assert bayes_optimal_accuracy(items) == pytest.approx(expected)
    with pytest.raises(ValueError):
        bayes_optimal_accuracy([])


def test_bayes_optimal_accuracy_is_what_the_gold_oracle_achieves_on_simulated_labels():
    pool = default_pool(seed=0)
    rng = random.Random(11)
    cands = [GOOD, OK, BAD, CUT, Candidate("It is a cafe."), Candidate("Lovely, lovely, lovely cafe!")]
    items, oracle_hits = [], 0
    n = 6000
    for _ in range(n):
        a, b = rng.sample(cands, 2)
        labeler = pool.comparers[rng.randrange(len(pool.comparers))]
        chosen = labeler.compare("p", a, b, rng)
        ga, gb = a.gold(), b.gold()
        items.append((labeler, ga, gb))
        oracle_hits += (chosen == 0) == (ga > gb) if ga != gb else 0.5
    bayes = bayes_optimal_accuracy(items)
    assert 0.5 < bayes < 1.0
    assert oracle_hits / n == pytest.approx(bayes, abs=0.02)


def _comparison(a: Candidate, b: Candidate, chosen: int, labeler: str) -> feedback_pb2.Comparison:
    return feedback_pb2.Comparison(
        prompt=rec.make_prompt("Review the cafe."),
        responses=[feedback_pb2.Response(text=a.text), feedback_pb2.Response(text=b.text)],
        chosen_index=chosen,
        labeler_id=labeler,
        metadata={"finished": f"{int(a.finished)},{int(b.finished)}"},
    )


def test_scored_pair_accuracy_overall_and_by_kind_of_pair():
    pool = default_pool(seed=0)
    labeler = pool.comparers[0].id
    bad_cut = Candidate("A terrible cafe with rude staff and", finished=False)
    records = [
        _comparison(GOOD, BAD, 0, labeler),  # both finished, label agrees with gold
        _comparison(OK, GOOD, 0, labeler),  # both finished, label disagrees with gold
        _comparison(GOOD, CUT, 0, labeler),  # one cut off
        _comparison(CUT, bad_cut, 1, labeler),  # both cut off, label disagrees with gold
    ]
    assert [pair_kind(r) for r in records] == [
        "both_finished",
        "both_finished",
        "one_cut_off",
        "both_cut_off",
    ]
    # a scorer that ranks by gold: right on gold every time, right on the labels where they follow gold
    gold_scores = [(a.gold(), b.gold()) for a, b in [(GOOD, BAD), (OK, GOOD), (GOOD, CUT), (CUT, bad_cut)]]
    oracle = scored_pair_accuracy(records, gold_scores, pool.by_id())
    assert oracle["gold_pair_accuracy"] == 1.0
    assert oracle["hits"] == [1.0, 0.0, 1.0, 0.0]
    assert oracle["accuracy"] == 0.5 == oracle["label_gold_agreement"]
    assert oracle["bayes_optimal_accuracy"] == pytest.approx(
        bayes_optimal_accuracy_of_records(records, pool.by_id())[0]
    )
    kinds = oracle["by_kind"]
    assert {k: v["comparisons"] for k, v in kinds.items()} == {
        "both_finished": 2,
        "one_cut_off": 1,
        "both_cut_off": 1,
    }
    assert kinds["both_finished"]["accuracy"] == 0.5 and kinds["one_cut_off"]["accuracy"] == 1.0
    assert kinds["both_cut_off"]["label_gold_agreement"] == 0.0
    # a constant scorer ties everything: one half everywhere
    flat = scored_pair_accuracy(records, [(0.3, 0.3)] * 4, pool.by_id())
    assert flat["accuracy"] == flat["gold_pair_accuracy"] == 0.5
    with pytest.raises(ValueError):
        scored_pair_accuracy(records, gold_scores[:3], pool.by_id())
    # comparisons by someone who is not a simulated comparer have no Bayes optimum, the rest is measured
    human = scored_pair_accuracy([_comparison(GOOD, BAD, 0, "alice")], [(1.0, 0.0)], pool.by_id())
    assert human["bayes_optimal_accuracy"] is None and human["accuracy"] == 1.0


def test_rater_scores_on_the_1_to_7_scale_and_tracks_gold():
    r = NoisyRater("r", sigma=0.1)
    rng = random.Random(5)
    good = [r.rate("p", GOOD, rng) for _ in range(300)]
    bad = [r.rate("p", BAD, rng) for _ in range(300)]
    assert all(1 <= s <= 7 and s == int(s) for s in good + bad)
    assert sum(good) / 300 > sum(bad) / 300 + 2
    assert sum(good) / 300 == pytest.approx(r.expected_rating(GOOD.gold()), abs=0.6)
    noisy = NoisyRater("n", sigma=1.0)
    spread = {noisy.rate("p", OK, rng) for _ in range(300)}
    assert len(spread) >= 4  # a noisier rater uses more of the scale for the same reply


def test_collected_feedback_lands_in_the_store_and_replays_the_noise_model(feedback_client):
    pool = default_pool(seed=2)
    register_labelers(feedback_client, pool.all())
    prompts = [f"Write a short review of cafe number {i}." for i in range(40)]
    demos = collect_demonstrations(
        feedback_client, pool.demonstrator, [(p, [BAD, GOOD, OK]) for p in prompts[:5]], tag="t1"
    )
    assert [d.response.text for d in demos] == [GOOD.text] * 5
    rng = random.Random(0)
    pairs = [(p, GOOD, CUT) if i % 2 else (p, BAD, OK) for i, p in enumerate(prompts)]
    comparisons = collect_comparisons(feedback_client, pool.comparers, pairs, tag="t1", rng=rng)
    ratings = collect_ratings(feedback_client, pool.raters, [(p, OK) for p in prompts[:6]], tag="t1", rng=rng)
    # an idempotent replay does not duplicate anything
    collect_comparisons(feedback_client, pool.comparers, pairs, tag="t1", rng=random.Random(0))

    exported = [rec.exported_record(m) for m in feedback_client.export(kinds=["comparison"])]
    assert len(exported) == len(comparisons) == 40
    assert {c.labeler_id for c in exported} <= {c.id for c in pool.comparers}
    assert all(c.metadata["finished"] in ("1,0", "1,1") for c in exported)
    stored_ratings = [rec.exported_record(m) for m in feedback_client.export(kinds=["rating"])]
    assert sorted(r.score for r in stored_ratings) == sorted(r.score for r in ratings)

    bayes, used = bayes_optimal_accuracy_of_records(exported, pool.by_id())
    assert used == 40
    expected = bayes_optimal_accuracy(
        [
            (
                pool.by_id()[c.labeler_id],
                gold_score(c.responses[0].text, finished=True),
                gold_score(c.responses[1].text, finished=c.metadata["finished"].endswith("1")),
            )
            for c in exported
        ]
    )
    assert bayes == pytest.approx(expected)
    assert 0.0 <= gold_agreement_of_records(exported) <= 1.0


def test_several_labelers_per_pair_each_give_their_own_record(feedback_client):
    pool = default_pool(seed=3)
    register_labelers(feedback_client, pool.all())
    pairs = [(f"Describe park number {i}.", GOOD, BAD) for i in range(20)]
    records = collect_comparisons(
        feedback_client, pool.comparers, pairs, tag="multi", rng=random.Random(1), labelers_per_pair=3
    )
    assert len(records) == 60
    by_pair: dict[str, list[str]] = {}
    for r in records:
        by_pair.setdefault(r.prompt.text, []).append(r.labeler_id)
    assert all(len(ids) == 3 == len(set(ids)) for ids in by_pair.values())  # three different people
    # replayed: nothing is duplicated in the store
    collect_comparisons(
        feedback_client, pool.comparers, pairs, tag="multi", rng=random.Random(1), labelers_per_pair=3
    )
    stored = [rec.exported_record(m) for m in feedback_client.export(kinds=["comparison"])]
    assert len([c for c in stored if rec.prompt_value(c.prompt).startswith("Describe park")]) == 60
    with pytest.raises(ValueError, match="labelers_per_pair"):
        collect_comparisons(
            feedback_client, pool.comparers, pairs, tag="x", rng=random.Random(1), labelers_per_pair=9
        )


def test_empty_replies_are_not_sent_to_the_store(feedback_client):
    pool = default_pool(seed=4)
    register_labelers(feedback_client, pool.all())
    empty = Candidate("   ")
    rng = random.Random(1)
    assert (
        collect_comparisons(feedback_client, pool.comparers, [("p-empty", empty, GOOD)], tag="e", rng=rng)
        == []
    )
    assert collect_ratings(feedback_client, pool.raters, [("p-empty", empty)], tag="e", rng=rng) == []
    demos = collect_demonstrations(
        feedback_client, pool.demonstrator, [("p-e1", [empty, OK]), ("p-e2", [empty])], tag="e"
    )
    assert [d.response.text for d in demos] == [OK.text]
