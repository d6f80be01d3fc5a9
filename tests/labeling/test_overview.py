"""Progress and the admins' overview: judgments per labeler and pairwise agreement (SQLite and PostgreSQL)."""

from __future__ import annotations

from rlhf.labeling.overview import agree
from rlhf.labeling.queue import LabelingQueue
from rlhf.labeling.tasks import Judgment, TaskSpec


def pair_tasks(n, prefix="p"):
    return [TaskSpec(f"{prefix}{i}: say something", [f"answer A{i}", f"answer B{i}"]) for i in range(n)]


def test_overview_counts_judgments_and_pairwise_agreement(store):
    queue = LabelingQueue(store, redundancy=3)
    ids = queue.enqueue(pair_tasks(4) + [TaskSpec("rate", ["r"])]).ids
    choices = {  # task index -> choices of ann, bob, cat (cat disagrees with the others on tasks 0-2)
        0: (0, 0, 1),
        1: (1, 1, 0),
        2: (0, 0, 1),
        3: (1, 1, 1),
    }
    for labeler, col in (("ann", 0), ("bob", 1), ("cat", 2)):
        for i in range(4):
            task = queue.next_task(labeler)
            assert task.id == ids[i]
            queue.submit(Judgment(task.id, labeler, chosen_index=choices[i][col]))
        rate = queue.next_task(labeler)
        queue.submit(Judgment(rate.id, labeler, score={"ann": 5, "bob": 6, "cat": 2}[labeler]))
    overview = queue.overview(since_us=0, low_agreement=0.6, min_pairs=3)
    people = {p.labeler_id: p for p in overview.labelers}
    assert overview.judgments_total == 15 and overview.judgments_needed == 0
    assert overview.multi_judged_tasks == 5 and overview.pairs == 15
    # ann-bob agree on all 5; ann-cat and bob-cat agree only on task 3.
    assert overview.agreed == 5 + 1 + 1
    assert (people["ann"].pairs, people["ann"].agreed) == (10, 6)
    assert (people["cat"].pairs, people["cat"].agreed) == (10, 2)
    assert [p.labeler_id for p in overview.low_agreement] == ["cat"]
    assert overview.tasks_complete == 5 and overview.tasks_open == 0


def test_comparisons_agree_on_the_same_choice_and_ratings_within_one_point():
    assert agree("comparison", (1, None), (1, 7)) and not agree("comparison", (0, None), (1, None))
    assert agree("rating", (None, 5), (None, 6)) and not agree("rating", (None, 5), (None, 7))


def test_progress_counts_a_labelers_judgments_and_what_is_left_for_them(store):
    queue = LabelingQueue(store, redundancy=2)
    queue.enqueue(pair_tasks(3))
    task = queue.next_task("ann")
    queue.submit(Judgment(task.id, "ann", chosen_index=0))
    progress = queue.progress("ann", since_us=0)
    assert (progress.done_today, progress.done_total) == (1, 1)
    assert progress.left_for_you == 2 and progress.judgments_needed == 5
