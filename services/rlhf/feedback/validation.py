"""Checks of incoming feedback records. Every error names the record's index and field, e.g.
``comparisons[7].chosen_index: 3 out of range for 2 responses``, and carries a short ``reason`` label used by
the ``rlhf_feedback_records_rejected_total{kind,reason}`` metric.

The functions take the proto messages of ``rlhf.v1`` and raise :class:`RecordError` (an INVALID_ARGUMENT);
they have no side effects, so a batch is checked completely before anything is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rlhf.core.errors import InvalidArgument
from rlhf.v1 import common_pb2, feedback_pb2

LABELER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}\Z")
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
ROLES = ("system", "user", "assistant")
LABELER_KINDS = ("", "human", "simulated")
DEFAULT_SCALE = (1.0, 7.0)
KIND_NAMES = {
    feedback_pb2.RECORD_KIND_PROMPT: "prompt",
    feedback_pb2.RECORD_KIND_DEMONSTRATION: "demonstration",
    feedback_pb2.RECORD_KIND_COMPARISON: "comparison",
    feedback_pb2.RECORD_KIND_RATING: "rating",
}


@dataclass(frozen=True)
class Limits:
    """Size limits of records (the text limit is configurable, the rest follow the contract)."""

    max_text_chars: int = 16384
    max_batch_size: int = 4096
    max_responses: int = 16
    max_chat_messages: int = 256
    max_metadata_entries: int = 64
    max_metadata_chars: int = 4096
    max_key_chars: int = 256
    max_short_chars: int = 256  # model_version, source, display_name, metadata keys


class RecordError(InvalidArgument):
    """INVALID_ARGUMENT for one field of one record, with a metric label ``reason``."""

    def __init__(self, field: str, why: str, reason: str):
        super().__init__(field, why)
        self.reason = reason


def check_string(value: str, field: str, limit: int, *, required: bool, empty_reason: str = "empty_text"):
    """Non-empty (when required), at most ``limit`` characters, no NUL (PostgreSQL cannot store it)."""
    if required and (not value or value.isspace()):  # (= not value.strip(), without the copy)
        raise RecordError(field, "empty" if not value else "only whitespace", empty_reason)
    if len(value) > limit:
        raise RecordError(field, f"{len(value)} chars > limit {limit}", "text_too_long")
    if "\x00" in value:
        raise RecordError(field, "contains a NUL character", "bad_text")


def check_batch(records, field: str, limits: Limits) -> None:
    if len(records) == 0:
        raise RecordError(field, "empty batch: send 1 or more records", "batch_size")
    if len(records) > limits.max_batch_size:
        raise RecordError(
            field, f"{len(records)} records > max_batch_size {limits.max_batch_size}", "batch_size"
        )


def check_key(key: str, field: str, limits: Limits, *, required: bool) -> None:
    if not key:
        if required:
            raise RecordError(field, "required (1-256 chars; the same key on a retry)", "missing_key")
        return
    check_string(key, field, limits.max_key_chars, required=False)


def check_labeler_id(labeler_id: str, field: str, *, required: bool) -> None:
    if not labeler_id:
        if required:
            raise RecordError(field, "required", "bad_labeler")
        return
    if not LABELER_ID.match(labeler_id):
        raise RecordError(field, f"{labeler_id[:40]!r} is not 1-128 chars of [A-Za-z0-9._:@-]", "bad_labeler")


def check_metadata(metadata, field: str, limits: Limits) -> None:
    if len(metadata) > limits.max_metadata_entries:
        raise RecordError(
            field, f"{len(metadata)} entries > limit {limits.max_metadata_entries}", "bad_metadata"
        )
    for key in sorted(metadata):
        check_string(
            key, f"{field}[{key[:40]!r}]", limits.max_short_chars, required=True, empty_reason="bad_metadata"
        )
        check_string(metadata[key], f"{field}[{key[:40]!r}]", limits.max_metadata_chars, required=False)


def check_prompt(prompt: common_pb2.Prompt, field: str, limits: Limits, *, required: bool = True) -> None:
    """A prompt is text or chat (tokens are not feedback: they depend on one tokenizer)."""
    which = prompt.WhichOneof("kind")
    if which is None:
        if required:
            raise RecordError(field, "required: set prompt.text or prompt.chat", "missing_prompt")
        return
    if which == "tokens":
        raise RecordError(
            f"{field}.tokens", "token ids are not accepted here; send text or chat", "bad_prompt"
        )
    if which == "text":
        check_string(prompt.text, f"{field}.text", limits.max_text_chars, required=True)
        return
    messages = prompt.chat.messages
    if not messages:
        raise RecordError(f"{field}.chat.messages", "empty conversation", "bad_prompt")
    if len(messages) > limits.max_chat_messages:
        raise RecordError(
            f"{field}.chat.messages",
            f"{len(messages)} messages > limit {limits.max_chat_messages}",
            "bad_prompt",
        )
    for i, message in enumerate(messages):
        path = f"{field}.chat.messages[{i}]"
        if message.role not in ROLES:
            raise RecordError(
                f"{path}.role", f"{message.role[:40]!r} is not one of {', '.join(ROLES)}", "bad_prompt"
            )
        check_string(
            message.content, f"{path}.content", limits.max_text_chars, required=message.role == "user"
        )


def check_response(response: feedback_pb2.Response, field: str, limits: Limits) -> None:
    check_string(response.text, f"{field}.text", limits.max_text_chars, required=True)
    check_string(response.model_version, f"{field}.model_version", limits.max_short_chars, required=False)


def _check_prompt_or_id(record, field: str, limits: Limits) -> None:
    check_prompt(record.prompt, f"{field}.prompt", limits, required=not record.prompt_id)
    if record.prompt_id:
        check_string(record.prompt_id, f"{field}.prompt_id", 64, required=True)


def check_prompt_record(record: feedback_pb2.PromptRecord, field: str, limits: Limits) -> None:
    check_key(record.idempotency_key, f"{field}.idempotency_key", limits, required=False)
    check_prompt(record.prompt, f"{field}.prompt", limits)
    check_string(record.source, f"{field}.source", limits.max_short_chars, required=False)
    check_metadata(record.metadata, f"{field}.metadata", limits)


def check_demonstration(record: feedback_pb2.Demonstration, field: str, limits: Limits) -> None:
    check_key(record.idempotency_key, f"{field}.idempotency_key", limits, required=True)
    _check_prompt_or_id(record, field, limits)
    if not record.HasField("response"):
        raise RecordError(f"{field}.response", "required", "missing_response")
    check_response(record.response, f"{field}.response", limits)
    check_labeler_id(record.labeler_id, f"{field}.labeler_id", required=False)
    check_metadata(record.metadata, f"{field}.metadata", limits)


def check_comparison(record: feedback_pb2.Comparison, field: str, limits: Limits) -> None:
    check_key(record.idempotency_key, f"{field}.idempotency_key", limits, required=True)
    _check_prompt_or_id(record, field, limits)
    responses = record.responses
    n = len(responses)
    if n < 2:
        raise RecordError(
            f"{field}.responses", f"{n} responses: a comparison needs 2 or more", "too_few_responses"
        )
    if n > limits.max_responses:
        raise RecordError(
            f"{field}.responses", f"{n} responses > limit {limits.max_responses}", "too_many_responses"
        )
    first_index: dict[str, int] = {}
    for i, response in enumerate(responses):
        check_response(response, f"{field}.responses[{i}]", limits)
        if response.text in first_index:
            raise RecordError(
                f"{field}.responses[{i}].text",
                f"identical to responses[{first_index[response.text]}]",
                "identical_responses",
            )
        first_index[response.text] = i
    has_chosen = record.HasField("chosen_index")
    if record.ranking:
        ranking = list(record.ranking)
        if sorted(ranking) != list(range(n)):
            raise RecordError(
                f"{field}.ranking", f"{ranking[:20]} is not a permutation of 0..{n - 1}", "bad_ranking"
            )
        if has_chosen and record.chosen_index != ranking[0]:
            raise RecordError(
                f"{field}.chosen_index",
                f"{record.chosen_index} differs from ranking[0] = {ranking[0]}",
                "bad_ranking",
            )
    elif not has_chosen:
        raise RecordError(f"{field}.chosen_index", "required (or give a full ranking)", "missing_choice")
    if has_chosen and record.chosen_index >= n:
        raise RecordError(
            f"{field}.chosen_index",
            f"{record.chosen_index} out of range for {n} responses",
            "chosen_out_of_range",
        )
    check_labeler_id(record.labeler_id, f"{field}.labeler_id", required=False)
    check_string(record.reason, f"{field}.reason", limits.max_text_chars, required=False)
    check_metadata(record.metadata, f"{field}.metadata", limits)


def rating_scale(record: feedback_pb2.Rating) -> tuple[float, float]:
    """The declared scale, or the default [1, 7] when unset."""
    if record.HasField("scale"):
        return record.scale.min, record.scale.max
    return DEFAULT_SCALE


def check_rating(record: feedback_pb2.Rating, field: str, limits: Limits) -> None:
    check_key(record.idempotency_key, f"{field}.idempotency_key", limits, required=True)
    _check_prompt_or_id(record, field, limits)
    if not record.HasField("response"):
        raise RecordError(f"{field}.response", "required", "missing_response")
    check_response(record.response, f"{field}.response", limits)
    low, high = rating_scale(record)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise RecordError(
            f"{field}.scale", f"[{low}, {high}] is not a finite range with min < max", "bad_scale"
        )
    if not math.isfinite(record.score):
        raise RecordError(f"{field}.score", f"{record.score} is not a finite number", "score_out_of_scale")
    if not low <= record.score <= high:
        raise RecordError(
            f"{field}.score", f"{record.score} outside the scale [{low}, {high}]", "score_out_of_scale"
        )
    check_labeler_id(record.labeler_id, f"{field}.labeler_id", required=False)
    check_string(record.reason, f"{field}.reason", limits.max_text_chars, required=False)
    check_metadata(record.metadata, f"{field}.metadata", limits)


CHECK_RECORD = {  # kind -> the check of one record of that kind
    "prompt": check_prompt_record,
    "demonstration": check_demonstration,
    "comparison": check_comparison,
    "rating": check_rating,
}


def check_labeler(labeler: feedback_pb2.Labeler, field: str, limits: Limits) -> None:
    check_labeler_id(labeler.id, f"{field}.id", required=True)
    check_string(labeler.display_name, f"{field}.display_name", limits.max_short_chars, required=False)
    if labeler.kind not in LABELER_KINDS:
        raise RecordError(
            f"{field}.kind", f"{labeler.kind[:40]!r} is not 'human' or 'simulated'", "bad_labeler"
        )
    check_metadata(labeler.metadata, f"{field}.metadata", limits)


def check_filter(record_filter: feedback_pb2.RecordFilter, field: str) -> None:
    for i, kind in enumerate(record_filter.kinds):
        if kind not in KIND_NAMES:
            raise RecordError(f"{field}.kinds[{i}]", f"{kind} is not a record kind", "bad_filter")
    for i, labeler_id in enumerate(record_filter.labeler_ids):
        check_labeler_id(labeler_id, f"{field}.labeler_ids[{i}]", required=True)
    after, before = record_filter.created_after, record_filter.created_before
    if (
        record_filter.HasField("created_after")
        and record_filter.HasField("created_before")
        and (after.seconds, after.nanos) >= (before.seconds, before.nanos)
    ):
        raise RecordError(f"{field}.created_before", "must be later than created_after", "bad_filter")


def check_snapshot_name(name: str, field: str) -> None:
    if not SNAPSHOT_NAME.match(name):
        raise RecordError(field, f"{name[:40]!r} is not 1-128 chars of [A-Za-z0-9._-]", "bad_snapshot")


def check_snapshot_request(snapshot: feedback_pb2.Snapshot, field: str, limits: Limits) -> None:
    check_snapshot_name(snapshot.name, f"{field}.name")
    if not (math.isfinite(snapshot.eval_fraction) and 0.0 <= snapshot.eval_fraction <= 0.9):
        raise RecordError(
            f"{field}.eval_fraction", f"{snapshot.eval_fraction} not in [0, 0.9]", "bad_snapshot"
        )
    check_filter(snapshot.filter, f"{field}.filter")
    check_string(snapshot.description, f"{field}.description", limits.max_text_chars, required=False)
