"""Validation of records without a database: every error names the record's index and field."""

import json

import pytest

from rlhf.core.errors import InvalidArgument
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.feedback.reads import decode_cursor, encode_cursor
from rlhf.feedback.snapshots import snapshot_content_hash, split_of
from rlhf.v1 import common_pb2, feedback_pb2

LIMITS = val.Limits(max_text_chars=100, max_batch_size=10)


def good_comparison(**kw):
    args = dict(prompt="Q?", responses=["a", "b"], idempotency_key="k", chosen_index=0, labeler_id="alice")
    args.update(kw)
    return rec.make_comparison(args.pop("prompt"), args.pop("responses"), **args)


def error_of(check, message, field="comparisons[3]"):
    with pytest.raises(val.RecordError) as info:
        check(message, field, LIMITS)
    return info.value


def test_valid_records_pass():
    val.check_comparison(good_comparison(), "c", LIMITS)
    val.check_comparison(
        good_comparison(responses=["a", "b", "c"], chosen_index=None, ranking=[2, 0, 1]), "c", LIMITS
    )
    val.check_rating(rec.make_rating("q", "r", 7, idempotency_key="k"), "r", LIMITS)
    val.check_rating(rec.make_rating("q", "r", -1.5, scale=(-2, 2), idempotency_key="k"), "r", LIMITS)
    val.check_demonstration(
        rec.make_demonstration([{"role": "user", "content": "hi"}], "yo", idempotency_key="k"), "d", LIMITS
    )
    val.check_prompt_record(feedback_pb2.PromptRecord(prompt=rec.make_prompt("p")), "p", LIMITS)


@pytest.mark.parametrize(
    "kwargs, field, reason, fragment",
    [
        (
            dict(chosen_index=2),
            "comparisons[3].chosen_index",
            "chosen_out_of_range",
            "2 out of range for 2 responses",
        ),
        (
            dict(responses=["same", "same"]),
            "comparisons[3].responses[1].text",
            "identical_responses",
            "identical to responses[0]",
        ),
        (dict(responses=["a", ""]), "comparisons[3].responses[1].text", "empty_text", "empty"),
        (dict(responses=["a", "   "]), "comparisons[3].responses[1].text", "empty_text", "whitespace"),
        (
            dict(responses=["a", "x" * 101]),
            "comparisons[3].responses[1].text",
            "text_too_long",
            "101 chars > limit 100",
        ),
        (dict(prompt=""), "comparisons[3].prompt.text", "empty_text", "empty"),
        (dict(prompt="x" * 101), "comparisons[3].prompt.text", "text_too_long", "limit 100"),
        (dict(prompt="a\x00b"), "comparisons[3].prompt.text", "bad_text", "NUL"),
        (dict(responses=["only one"]), "comparisons[3].responses", "too_few_responses", "needs 2 or more"),
        (
            dict(responses=[str(i) for i in range(17)], chosen_index=0),
            "comparisons[3].responses",
            "too_many_responses",
            "limit 16",
        ),
        (dict(chosen_index=None), "comparisons[3].chosen_index", "missing_choice", "required"),
        (
            dict(chosen_index=None, ranking=[0, 0]),
            "comparisons[3].ranking",
            "bad_ranking",
            "not a permutation",
        ),
        (
            dict(chosen_index=1, ranking=[0, 1]),
            "comparisons[3].chosen_index",
            "bad_ranking",
            "differs from ranking[0]",
        ),
        (dict(idempotency_key=""), "comparisons[3].idempotency_key", "missing_key", "required"),
        (dict(idempotency_key="k" * 257), "comparisons[3].idempotency_key", "text_too_long", "257 chars"),
        (dict(labeler_id="has space"), "comparisons[3].labeler_id", "bad_labeler", "[A-Za-z0-9._:@-]"),
        (dict(reason="r" * 101), "comparisons[3].reason", "text_too_long", "limit 100"),
        (
            dict(prompt=[{"role": "robot", "content": "hi"}]),
            "comparisons[3].prompt.chat.messages[0].role",
            "bad_prompt",
            "'robot'",
        ),
        (
            dict(prompt=[{"role": "user", "content": ""}]),
            "comparisons[3].prompt.chat.messages[0].content",
            "empty_text",
            "empty",
        ),
        (dict(metadata={"k": "v" * 5000}), "comparisons[3].metadata['k']", "text_too_long", "limit 4096"),
    ],
)
def test_comparison_errors_name_index_and_field(kwargs, field, reason, fragment):
    err = error_of(val.check_comparison, good_comparison(**kwargs))
    assert err.field == field
    assert err.reason == reason
    assert fragment in err.message
    assert err.message.startswith(field + ": ")


def test_token_prompts_are_refused():
    message = good_comparison()
    message.prompt.CopyFrom(common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=[1, 2])))
    assert error_of(val.check_comparison, message).field == "comparisons[3].prompt.tokens"


def test_missing_prompt_is_allowed_only_with_a_prompt_id():
    message = good_comparison()
    message.ClearField("prompt")
    assert error_of(val.check_comparison, message).field == "comparisons[3].prompt"
    message.prompt_id = "pr_123"
    val.check_comparison(message, "c", LIMITS)


@pytest.mark.parametrize(
    "score, scale, field, fragment",
    [
        (8, None, "ratings[0].score", "outside the scale [1.0, 7.0]"),
        (0.5, None, "ratings[0].score", "outside the scale"),
        (float("nan"), None, "ratings[0].score", "not a finite number"),
        (float("inf"), (0, float("inf")), "ratings[0].scale", "not a finite range"),
        (1, (2, 2), "ratings[0].scale", "min < max"),
        (3, (5, 1), "ratings[0].scale", "min < max"),
    ],
)
def test_rating_outside_its_scale(score, scale, field, fragment):
    message = rec.make_rating("q", "r", score, scale=scale, idempotency_key="k")
    err = error_of(val.check_rating, message, "ratings[0]")
    assert err.field == field and fragment in err.message


def test_rating_bounds_are_inclusive():
    for score in (1, 7):
        val.check_rating(rec.make_rating("q", "r", score, idempotency_key="k"), "r", LIMITS)


def test_batch_size_limits():
    with pytest.raises(val.RecordError, match="empty batch"):
        val.check_batch([], "comparisons", LIMITS)
    with pytest.raises(val.RecordError, match="11 records > max_batch_size 10"):
        val.check_batch([None] * 11, "comparisons", LIMITS)


def test_labeler_and_snapshot_checks():
    err = error_of(val.check_labeler, feedback_pb2.Labeler(id="a", kind="robot"), "labelers[1]")
    assert err.field == "labelers[1].kind"
    err = error_of(val.check_snapshot_request, feedback_pb2.Snapshot(name="bad name"), "snapshot")
    assert err.field == "snapshot.name"
    err = error_of(
        val.check_snapshot_request, feedback_pb2.Snapshot(name="ok", eval_fraction=0.95), "snapshot"
    )
    assert err.field == "snapshot.eval_fraction"
    snap = feedback_pb2.Snapshot(name="ok", filter=feedback_pb2.RecordFilter(kinds=[0]))
    assert error_of(val.check_snapshot_request, snap, "snapshot").field == "snapshot.filter.kinds[0]"
    snap = feedback_pb2.Snapshot(name="ok", filter=rec.make_filter(created_after_us=10, created_before_us=5))
    assert error_of(val.check_snapshot_request, snap, "snapshot").field == "snapshot.filter.created_before"


def test_record_ids_are_derived_from_kind_and_key():
    assert rec.record_id("comparison", "k1") == rec.record_id("comparison", "k1")
    assert rec.record_id("comparison", "k1") != rec.record_id("rating", "k1")
    assert rec.record_id("comparison", "k1").startswith("cmp_")


def test_split_depends_only_on_seed_and_id_and_matches_the_fraction():
    ids = [rec.record_id("comparison", f"k{i}") for i in range(5000)]
    splits = [split_of(7, i, 0.2) for i in ids]
    assert splits == [split_of(7, i, 0.2) for i in ids]
    eval_share = splits.count(feedback_pb2.SPLIT_EVAL) / len(ids)
    assert 0.17 < eval_share < 0.23
    assert splits != [split_of(8, i, 0.2) for i in ids]
    assert all(split_of(7, i, 0.0) == feedback_pb2.SPLIT_TRAIN for i in ids[:100])
    pairs = list(zip(ids, splits, strict=True))
    assert snapshot_content_hash(pairs) == snapshot_content_hash(pairs[::-1])


def test_cursor_round_trip_and_malformed_cursors():
    assert decode_cursor(encode_cursor(12345)) == 12345
    for bad in ["", "nope", "djE6LTE", "!!!", "x" * 100, encode_cursor(5) + "A"]:
        with pytest.raises(InvalidArgument, match="cursor"):
            decode_cursor(bad)


def test_content_hash_from_encoded_payload_is_the_hash_of_the_whole_object():
    """The store hashes each payload's canonical JSON once; that must stay the documented hash."""
    payload = rec.comparison_payload(
        good_comparison(prompt=[{"role": "user", "content": 'héllo "q"\n'}], reason="🙂", metadata={"b": "1"})
    )
    for value in [payload, "é\n", [1.5, 1e-7, None, True], {"b": {"z": 1, "a": 2}, "a": []}]:
        assert rec.canonical_json(value) == json.dumps(
            value, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
    for labeler, prompt_id in [("alice", ""), ("", "pr_1"), ("", "")]:
        whole = rec.sha256_hex(
            json.dumps(
                {"p": payload, "l": labeler, "pid": prompt_id},
                sort_keys=True,
                ensure_ascii=False,
                separators=(",", ":"),
            )
        )
        assert rec.content_hash(payload, labeler, prompt_id) == whole
        assert rec.content_hash_of_json(rec.canonical_json(payload), labeler, prompt_id) == whole
