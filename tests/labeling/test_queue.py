"""The labeling queue at store level, on SQLite and PostgreSQL: enqueue, assignment with redundancy, judgments
written once through the store's idempotent path, concurrent labelers, agreement."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from rlhf.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.queue import LabelingQueue
from rlhf.labeling.tasks import Judgment, TaskSpec, judgment_key
from rlhf.v1 import feedback_pb2


def exported(store, kind):
    return [getattr(r, kind) for r in store.export(kinds=[kind])]


def pair_tasks(n, prefix="p"):
    return [TaskSpec(f"{prefix}{i}: say something", [f"answer A{i}", f"answer B{i}"]) for i in range(n)]


def test_enqueue_is_idempotent_and_stores_prompts(queue, store):
    first = queue.enqueue(pair_tasks(3) + [TaskSpec("rate this", ["only one"], redundancy=1)])
    assert (first.created, first.existing) == (4, 0)
    again = queue.enqueue(pair_tasks(3))
    assert (again.created, again.existing) == (0, 3)
    assert list(again.ids) == list(first.ids[:3])
    assert queue.judgments_needed() == 3 * 2 + 1
    prompts = exported(store, "prompt")
    assert len(prompts) == 4
    assert queue.get_task(first.ids[3]).kind == "rating"
    assert queue.get_task(first.ids[0]).prompt_id in {p.id for p in prompts}


def test_an_explicit_key_reused_for_other_content_is_refused(queue):
    queue.enqueue([TaskSpec("q", ["a", "b"], idempotency_key="batch-1/0")])
    with pytest.raises(AlreadyExists, match="batch-1/0"):
        queue.enqueue([TaskSpec("q", ["a", "c"], idempotency_key="batch-1/0")])


@pytest.mark.parametrize(
    "spec, field",
    [
        (TaskSpec("q", ["same", "same"]), "tasks[0].responses[1].text"),
        (TaskSpec("q", []), "tasks[0].responses"),
        (TaskSpec("", ["a", "b"]), "tasks[0].prompt.text"),
        (TaskSpec("q", ["a", ""]), "tasks[0].responses[1].text"),
        (TaskSpec("q", ["a", "b"], redundancy=0), "tasks[0].redundancy"),
        (TaskSpec("q", ["a", {"text": "b", "colour": "red"}]), "tasks[0].responses[1]"),
    ],
)
def test_bad_tasks_are_refused_naming_the_field(queue, spec, field):
    with pytest.raises(InvalidArgument) as info:
        queue.enqueue([spec])
    assert info.value.field == field
    assert queue.judgments_needed() == 0


def test_each_task_gets_redundancy_judgments_from_different_labelers(queue, store):
    ids = queue.enqueue(pair_tasks(2)).ids
    got = {}
    for labeler in ["ann", "bob", "cat"]:
        got[labeler] = []
        while (task := queue.next_task(labeler)) is not None:
            got[labeler].append(task.id)
            queue.submit(Judgment(task.id, labeler, chosen_index=0))
    assert got["ann"] == list(ids)  # first in, first out
    assert got["bob"] == list(ids)
    assert got["cat"] == []  # both tasks have their 2 judgments
    assert queue.judgments_needed() == 0
    comparisons = exported(store, "comparison")
    assert sorted((c.labeler_id, c.metadata["labeling_task_id"]) for c in comparisons) == sorted(
        (who, t) for who in ("ann", "bob") for t in ids
    )


def test_reloading_returns_the_same_task_until_it_is_judged(queue):
    queue.enqueue(pair_tasks(2))
    first = queue.next_task("ann")
    assert queue.next_task("ann").id == first.id
    queue.submit(Judgment(first.id, "ann", chosen_index=1))
    assert queue.next_task("ann").id != first.id


def test_a_judgment_is_stored_once_however_often_it_is_submitted(queue, store):
    queue.enqueue(pair_tasks(1))
    task = queue.next_task("ann")
    judgment = Judgment(task.id, "ann", chosen_index=1, score=6, reason="clearer")
    first = queue.submit(judgment)
    assert first.created and first.created_by_kind == {"comparison": 1, "rating": 1}
    for _ in range(3):
        replay = queue.submit(judgment)
        assert not replay.created and replay.record_ids == first.record_ids
    [comparison] = exported(store, "comparison")
    [rating] = exported(store, "rating")
    assert comparison.idempotency_key == judgment_key(task.id, "ann")
    assert comparison.chosen_index == 1 and comparison.reason == "clearer"
    assert [r.text for r in comparison.responses] == ["answer A0", "answer B0"]
    assert rating.response.text == "answer B0" and rating.score == 6  # the chosen response's score
    assert comparison.prompt_id == task.prompt_id
    assert queue.get_task(task.id).judgments == 1
    with pytest.raises(AlreadyExists):  # changing one's mind after submitting: the first answer stands
        queue.submit(Judgment(task.id, "ann", chosen_index=0))
    assert len(exported(store, "comparison")) == 1


def test_rating_tasks_and_rankings(queue, store):
    queue.enqueue([TaskSpec("rate", ["one response"]), TaskSpec("rank", ["x", "y", "z"])])
    rate = queue.next_task("ann")
    with pytest.raises(InvalidArgument, match="score"):
        queue.submit(Judgment(rate.id, "ann"))
    with pytest.raises(InvalidArgument, match="score"):
        queue.submit(Judgment(rate.id, "ann", score=8))
    queue.submit(Judgment(rate.id, "ann", score=3))
    rank = queue.next_task("ann")
    with pytest.raises(InvalidArgument, match="ranking"):
        queue.submit(Judgment(rank.id, "ann", ranking=[2, 0]))
    with pytest.raises(InvalidArgument, match="ranked first"):
        queue.submit(Judgment(rank.id, "ann", chosen_index=1, ranking=[2, 0, 1]))
    queue.submit(Judgment(rank.id, "ann", ranking=[2, 0, 1]))
    [rating] = exported(store, "rating")
    assert (rating.score, rating.scale.min, rating.scale.max) == (3, 1, 7)
    [comparison] = exported(store, "comparison")
    assert list(comparison.ranking) == [2, 0, 1] and comparison.chosen_index == 2


def test_only_the_assigned_labeler_may_judge_and_skips_are_final(queue):
    queue.enqueue(pair_tasks(2))
    task = queue.next_task("ann")
    with pytest.raises(FailedPrecondition, match="not assigned"):
        queue.submit(Judgment(task.id, "bob", chosen_index=0))
    queue.skip(task.id, "ann")
    with pytest.raises(FailedPrecondition, match="skipped"):
        queue.submit(Judgment(task.id, "ann", chosen_index=0))
    assert queue.next_task("ann").id != task.id  # never given again
    assert queue.next_task("bob").id == task.id  # but it goes to others


def test_an_expired_lease_frees_the_slot_and_a_late_answer_is_refused(store):
    queue = LabelingQueue(store, redundancy=1, lease_seconds=1e-6)  # every lease has run out at once
    queue.enqueue(pair_tasks(1))
    late = queue.next_task("ann")
    assert queue.next_task("bob").id == late.id  # ann's slot went to bob
    queue.submit(Judgment(late.id, "bob", chosen_index=0))
    with pytest.raises(FailedPrecondition, match="ran out"):
        queue.submit(Judgment(late.id, "ann", chosen_index=1))
    assert queue.get_task(late.id).judgments == 1


def test_a_late_answer_counts_while_the_task_has_room(store):
    queue = LabelingQueue(store, redundancy=1, lease_seconds=1e-6)
    queue.enqueue(pair_tasks(1))
    task = queue.next_task("ann")
    assert queue.submit(Judgment(task.id, "ann", chosen_index=0)).created


def _work_queue(url: str, labeler: str, barrier: threading.Barrier, seen: dict, errors: list) -> None:
    try:
        with FeedbackStore(url, migrate=False) as store:  # its own engine, like another server process
            queue = LabelingQueue(store, redundancy=2)
            barrier.wait()
            while (task := queue.next_task(labeler)) is not None:
                seen[labeler].append(task.id)
                choice = int(task.id[-1], 16) % 2
                queue.submit(Judgment(task.id, labeler, chosen_index=choice))
    except Exception as exc:  # surfaced by the test
        errors.append(exc)


def test_concurrent_labelers_never_get_a_task_beyond_its_redundancy(store, database_url):
    queue = LabelingQueue(store, redundancy=2)
    ids = queue.enqueue(pair_tasks(24)).ids
    labelers = [f"labeler-{i}" for i in range(5)]
    seen = {labeler: [] for labeler in labelers}
    errors: list = []
    barrier = threading.Barrier(len(labelers))
    threads = [
        threading.Thread(target=_work_queue, args=(database_url, labeler, barrier, seen, errors))
        for labeler in labelers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for labeler, got in seen.items():
        assert len(got) == len(set(got)), f"{labeler} got a task twice"
    per_task = Counter(task_id for got in seen.values() for task_id in got)
    assert per_task == {task_id: 2 for task_id in ids}
    comparisons = exported(store, "comparison")
    assert len(comparisons) == 48
    assert len({c.idempotency_key for c in comparisons}) == 48
    assert queue.judgments_needed() == 0


def test_concurrent_claims_fill_each_task_exactly_to_its_redundancy(store, database_url):
    queue = LabelingQueue(store, redundancy=2)
    ids = queue.enqueue(pair_tasks(3)).ids  # 6 slots for 8 labelers
    labelers = [f"l{i}" for i in range(8)]
    claimed: dict[str, str | None] = {}
    errors: list = []
    barrier = threading.Barrier(len(labelers))

    def claim(labeler):
        try:
            with FeedbackStore(database_url, migrate=False) as s:
                q = LabelingQueue(s, redundancy=2)
                barrier.wait()
                task = q.next_task(labeler)
                claimed[labeler] = task.id if task else None
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(labeler,)) for labeler in labelers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    per_task = Counter(task_id for task_id in claimed.values() if task_id)
    assert per_task == {task_id: 2 for task_id in ids}
    assert list(claimed.values()).count(None) == 2


def test_export_holds_only_judgments_from_the_queue(queue, store):
    store.add_comparisons(
        [
            feedback_pb2.Comparison(
                idempotency_key="imported",
                prompt={"text": "q"},
                responses=[{"text": "a"}, {"text": "b"}],
                chosen_index=0,
            )
        ]
    )
    queue.enqueue(pair_tasks(1))
    task = queue.next_task("ann")
    queue.submit(Judgment(task.id, "ann", chosen_index=0))
    keys = [r.comparison.idempotency_key for r in queue.export_judgments()]
    assert keys == [judgment_key(task.id, "ann")]
