"""The store's behaviour, the same suite against SQLite and a real PostgreSQL server."""

import time

import pytest

from rlhf.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from rlhf.feedback import records as rec
from rlhf.feedback.schema import labelers
from rlhf.feedback.store import FeedbackStore
from rlhf.v1 import feedback_pb2


def comparisons(n, prefix="k", labeler="alice", start=0):
    return [
        rec.make_comparison(
            f"prompt {i}",
            [f"good {i}", f"bad {i}"],
            idempotency_key=f"{prefix}{i}",
            chosen_index=0,
            labeler_id=labeler,
        )
        for i in range(start, start + n)
    ]


def exported(store, **kw):
    return [rec.exported_record(m) for m in store.export(**kw)]


def test_every_kind_round_trips_with_all_fields(store):
    prompt = feedback_pb2.PromptRecord(
        idempotency_key="p1",
        prompt=rec.make_prompt("Tell a joke"),
        source="demo",
        metadata={"topic": "humor"},
    )
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    demo = rec.make_demonstration(
        chat, "Hello!", idempotency_key="d1", labeler_id="bob", model_version="human"
    )
    comparison = rec.make_comparison(
        "Q",
        ["a", "b", "c"],
        idempotency_key="c1",
        ranking=[2, 0, 1],
        labeler_id="alice",
        model_versions=["policy:1", "policy:2", ""],
        reason="c is clearer",
        metadata={"ui": "v2"},
    )
    rating = rec.make_rating(
        "Q", "a", 0.75, scale=(0, 1), idempotency_key="r1", labeler_id="carol", reason="ok"
    )
    before = time.time()
    assert store.add_prompts([prompt]).created == 1
    assert store.add_demonstrations([demo]).created == 1
    assert store.add_comparisons([comparison]).created == 1
    assert store.add_ratings([rating]).created == 1
    after = time.time()
    out = exported(store)
    assert [type(m).__name__ for m in out] == ["PromptRecord", "Demonstration", "Comparison", "Rating"]
    kinds = ["prompt", "demonstration", "comparison", "rating"]
    for message, sent, kind in zip(out, [prompt, demo, comparison, rating], kinds, strict=True):
        assert message.id == rec.record_id(kind, sent.idempotency_key)
        assert before - 1 <= message.created_at.ToMicroseconds() / 1e6 <= after + 1
        expected = type(sent)()
        expected.CopyFrom(sent)
        expected.id = message.id
        expected.created_at.CopyFrom(message.created_at)
        if isinstance(expected, feedback_pb2.Comparison):
            expected.chosen_index = 2  # derived from ranking[0]
        assert message == expected
    assert out[3].scale.min == 0 and out[3].scale.max == 1
    default_scale = store.add_ratings([rec.make_rating("Q", "b", 3, idempotency_key="r2")])
    assert exported(store, kinds=["rating"])[1].scale == feedback_pb2.RatingScale(min=1, max=7)
    assert default_scale.created == 1


def test_retried_batch_returns_same_ids_and_creates_nothing(store):
    batch = comparisons(50)
    first = store.add_comparisons(batch)
    assert (first.created, first.existing) == (50, 0)
    again = store.add_comparisons(batch)
    assert list(again.ids) == list(first.ids)
    assert (again.created, again.existing) == (0, 50)
    mixed = store.add_comparisons(comparisons(10, start=45))  # 5 replayed + 5 new
    assert (mixed.created, mixed.existing) == (5, 5)
    assert list(mixed.ids[:5]) == list(first.ids[45:])
    assert store.stats().records_by_kind["comparison"] == 55


def test_replayed_key_with_different_content_is_already_exists_and_writes_nothing(store):
    store.add_comparisons(comparisons(3))
    batch = comparisons(2, start=100) + [
        rec.make_comparison("changed", ["x", "y"], idempotency_key="k1", chosen_index=1)
    ]
    with pytest.raises(AlreadyExists, match=r"comparisons\[2\]\.idempotency_key: 'k1' is already stored"):
        store.add_comparisons(batch)
    assert store.stats().records_by_kind["comparison"] == 3
    assert [m.idempotency_key for m in exported(store)] == ["k0", "k1", "k2"]


def test_batch_with_one_bad_record_writes_nothing(store):
    batch = comparisons(20)
    batch[13].chosen_index = 5
    with pytest.raises(InvalidArgument) as info:
        store.add_comparisons(batch)
    assert str(info.value) == "comparisons[13].chosen_index: 5 out of range for 2 responses"
    assert store.stats().records_by_kind["comparison"] == 0
    assert store.stats().num_labelers == 0


def test_repeated_keys_inside_one_batch(store):
    batch = comparisons(3) + comparisons(1)  # k0 twice, same content
    result = store.add_comparisons(batch)
    assert result.ids[3] == result.ids[0]
    assert (result.created, result.existing) == (3, 1)
    conflicting = comparisons(2, prefix="z") + [
        rec.make_comparison("other", ["p", "q"], idempotency_key="z0", chosen_index=0)
    ]
    with pytest.raises(
        InvalidArgument, match=r"comparisons\[2\]\.idempotency_key: 'z0' repeats comparisons\[0\]"
    ):
        store.add_comparisons(conflicting)
    assert store.stats().records_by_kind["comparison"] == 3


def test_prompts_without_key_are_stored_once_and_can_be_referenced(store):
    p = feedback_pb2.PromptRecord(prompt=rec.make_prompt("Summarize this"))
    first = store.add_prompts([p, p])
    assert first.created == 1 and first.ids[0] == first.ids[1]
    tagged = feedback_pb2.PromptRecord(prompt=rec.make_prompt("Summarize this"), source="elsewhere")
    assert store.add_prompts([tagged]).ids[0] == first.ids[0]
    demo = feedback_pb2.Demonstration(
        idempotency_key="d", prompt_id=first.ids[0], response=feedback_pb2.Response(text="A summary.")
    )
    store.add_demonstrations([demo])
    stored = exported(store, kinds=["demonstration"])[0]
    assert stored.prompt.text == "Summarize this" and stored.prompt_id == first.ids[0]
    missing = feedback_pb2.Demonstration(
        idempotency_key="e", prompt_id="pr_nope", response=feedback_pb2.Response(text="x")
    )
    with pytest.raises(InvalidArgument, match=r"demonstrations\[0\]\.prompt_id: no stored prompt"):
        store.add_demonstrations([demo, missing][1:])


def test_labelers_created_on_first_use_and_updated_by_add_labelers(store):
    store.add_comparisons(comparisons(2, labeler="alice"))
    assert store.stats().num_labelers == 1
    result = store.add_labelers(
        [
            feedback_pb2.Labeler(id="alice", display_name="Alice", kind="human"),
            feedback_pb2.Labeler(id="sim-1", kind="simulated"),
        ]
    )
    assert list(result.ids) == ["alice", "sim-1"] and (result.created, result.existing) == (1, 1)
    assert store.add_labelers([feedback_pb2.Labeler(id="sim-1", kind="simulated")]).existing == 1
    assert store.stats().num_labelers == 2


def test_require_known_labelers(database_url):
    with FeedbackStore(database_url, require_known_labelers=True) as store:
        with pytest.raises(InvalidArgument, match=r"comparisons\[0\]\.labeler_id: unknown labeler 'alice'"):
            store.add_comparisons(comparisons(1))
        store.add_labelers([feedback_pb2.Labeler(id="alice", kind="human")])
        assert store.add_comparisons(comparisons(1)).created == 1


def test_export_filters_by_kind_labeler_and_time(store):
    store.add_comparisons(comparisons(3, labeler="alice"))
    time.sleep(0.01)
    middle = time.time_ns() // 1000
    time.sleep(0.01)
    store.add_comparisons(comparisons(2, prefix="b", labeler="bob"))
    store.add_ratings([rec.make_rating("q", "r", 4, idempotency_key="r", labeler_id="bob")])
    assert len(exported(store)) == 6
    assert len(exported(store, kinds=["rating"])) == 1
    assert [m.labeler_id for m in exported(store, labeler_ids=["bob"])] == ["bob"] * 3
    assert len(exported(store, created_after_us=middle)) == 3
    assert len(exported(store, created_before_us=middle)) == 3
    assert len(exported(store, kinds=["comparison"], labeler_ids=["bob"], created_after_us=middle)) == 2


def test_export_cursor_resumes_after_the_last_record(database_url):
    with FeedbackStore(database_url, export_page_size=4) as store:
        store.add_comparisons(comparisons(10))
        full = list(store.export())
        assert [rec.exported_record(m).idempotency_key for m in full] == [f"k{i}" for i in range(10)]
        head = list(store.export(limit=3))
        assert len(head) == 3
        rest = list(store.export(cursor=head[-1].cursor))
        assert [m.cursor for m in head + rest] == [m.cursor for m in full]
        store.add_comparisons(comparisons(2, start=10))
        tail = list(store.export(cursor=full[-1].cursor))
        assert [rec.exported_record(m).idempotency_key for m in tail] == ["k10", "k11"]
        with pytest.raises(InvalidArgument, match="cursor"):
            list(store.export(cursor="garbage"))


def test_snapshot_freezes_records_with_a_deterministic_split(store):
    store.add_comparisons(comparisons(200))
    store.add_ratings([rec.make_rating("q", f"r{i}", 4, idempotency_key=f"r{i}") for i in range(20)])
    request = feedback_pb2.Snapshot(
        name="rm-v1",
        filter=rec.make_filter(kinds=["comparison"]),
        eval_fraction=0.25,
        seed=3,
        description="first",
    )
    snap = store.create_snapshot(request)
    assert snap.records_by_kind == {"comparison": 200}
    assert snap.num_train + snap.num_eval == 200 and 25 <= snap.num_eval <= 75
    assert len(snap.content_hash) == 64
    store.add_comparisons(comparisons(10, start=200))  # after the snapshot: not in it
    train = exported(store, snapshot="rm-v1", split="train")
    evals = list(store.export(snapshot="rm-v1", split="eval"))
    assert len(train) == snap.num_train and len(evals) == snap.num_eval
    assert all(m.split == feedback_pb2.SPLIT_EVAL for m in evals)
    assert {m.id for m in train}.isdisjoint(rec.exported_record(m).id for m in evals)
    assert len(list(store.export(snapshot="rm-v1"))) == 200
    # Same name and parameters: the same snapshot; different parameters: ALREADY_EXISTS.
    assert store.create_snapshot(request) == snap
    with pytest.raises(AlreadyExists, match="different parameters"):
        store.create_snapshot(feedback_pb2.Snapshot(name="rm-v1", eval_fraction=0.5, seed=3))
    other_seed = store.create_snapshot(
        feedback_pb2.Snapshot(name="rm-v2", filter=request.filter, eval_fraction=0.25, seed=4)
    )
    assert other_seed.content_hash != snap.content_hash
    assert [s.name for s in store.list_snapshots()] == ["rm-v2", "rm-v1"]
    assert store.get_snapshot("rm-v1") == snap
    assert store.stats().num_snapshots == 2


def test_split_is_independent_of_insertion_order(store, tmp_path):
    batch = comparisons(60)
    store.add_comparisons(batch)
    a = store.create_snapshot(feedback_pb2.Snapshot(name="s", eval_fraction=0.3, seed=11))
    with FeedbackStore(f"sqlite:///{tmp_path}/other.db") as other:
        other.add_comparisons(batch[::-1])
        b = other.create_snapshot(feedback_pb2.Snapshot(name="s", eval_fraction=0.3, seed=11))
        splits_b = {rec.exported_record(m).id: m.split for m in other.export(snapshot="s")}
    assert a.content_hash == b.content_hash
    assert {rec.exported_record(m).id: m.split for m in store.export(snapshot="s")} == splits_b


def test_snapshot_errors(store):
    with pytest.raises(FailedPrecondition, match="no records match"):
        store.create_snapshot(feedback_pb2.Snapshot(name="empty"))
    with pytest.raises(NotFound):
        store.get_snapshot("missing")
    with pytest.raises(NotFound):
        list(store.export(snapshot="missing"))
    with pytest.raises(InvalidArgument, match="split"):
        list(store.export(split="eval"))


def test_stats(store):
    store.add_comparisons(comparisons(4, labeler="alice"))
    store.add_ratings([rec.make_rating("q", "r", 2, idempotency_key="r", labeler_id="bob")])
    store.add_prompts([feedback_pb2.PromptRecord(prompt=rec.make_prompt("p"))])
    stats = store.stats()
    assert dict(stats.records_by_kind) == {"prompt": 1, "demonstration": 0, "comparison": 4, "rating": 1}
    assert dict(stats.records_by_labeler) == {"alice": 4, "bob": 1}
    assert stats.num_labelers == 2 and stats.size_bytes > 0
    assert stats.backend == store.backend


def test_data_survives_reopening(database_url):
    with FeedbackStore(database_url) as store:
        ids = list(store.add_comparisons(comparisons(5)).ids)
    with FeedbackStore(database_url) as store:  # migrations run again: a no-op
        assert [m.id for m in exported(store)] == ids
        assert store.schema_revision() == "0003"


def test_records_about_one_prompt_share_their_split(store):
    """Several comparisons per prompt (k samples, all pairs): a prompt's records are all train or all eval,
    so the held-out split never shares a prompt or a response with training."""
    items = []
    for p in range(60):
        for j in range(3):
            items.append(
                rec.make_comparison(
                    f"shared prompt {p}",
                    [f"a{p}-{j}", f"b{p}-{j}"],
                    idempotency_key=f"s{p}-{j}",
                    chosen_index=0,
                )
            )
    store.add_comparisons(items)
    snap = store.create_snapshot(
        feedback_pb2.Snapshot(name="grouped", filter=rec.make_filter(kinds=["comparison"]), eval_fraction=0.3)
    )
    assert 0 < snap.num_eval < 180 and snap.num_eval % 3 == 0
    split_of_prompt: dict[str, set] = {}
    for m in store.export(snapshot="grouped"):
        split_of_prompt.setdefault(rec.prompt_value(rec.exported_record(m).prompt), set()).add(m.split)
    assert len(split_of_prompt) == 60 and all(len(s) == 1 for s in split_of_prompt.values())


def test_a_write_transaction_stores_records_and_own_rows_together_or_not_at_all(store):
    rows = store.prepare("comparison", comparisons(2, prefix="tx", labeler="tx-labeler"))
    with pytest.raises(RuntimeError, match="caller failed"):
        with store.write_transaction() as tx:
            assert tx.write_records("comparison", rows).created == 2
            raise RuntimeError("caller failed after writing")
    assert exported(store) == [] and store.stats().num_labelers == 0
    with store.write_transaction() as tx:
        result = tx.write_records("comparison", rows)
        tx.execute(labelers.update().where(labelers.c.id == "tx-labeler").values(display_name="TX"))
    assert result.created == 2 and len(exported(store)) == 2
    assert store.has_labeler("tx-labeler") and not store.has_labeler("nobody")


def test_prepare_refuses_a_bad_record_without_touching_the_database(store):
    bad = comparisons(1)
    bad[0].chosen_index = 5
    with pytest.raises(InvalidArgument, match=r"comparisons\[0\]\.chosen_index"):
        store.prepare("comparison", bad)
    assert store.stats().num_labelers == 0
