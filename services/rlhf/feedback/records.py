"""Feedback records as plain JSON-able payloads, and back to ``rlhf.v1`` messages.

A record's *payload* is what the store keeps in its JSON column: the content that defines the record,
without the id, timestamp, idempotency key, labeler id and prompt id (those are columns). Shapes:

    prompt:        {"prompt": P, "source"?: str, "metadata"?: {str: str}}
    demonstration: {"prompt": P, "response": R, "metadata"?}
    comparison:    {"prompt": P, "responses": [R, ...], "chosen_index"?: int, "ranking"?: [int, ...],
                    "reason"?: str, "metadata"?}
    rating:        {"prompt": P, "response": R, "score": float, "scale": [min, max], "reason"?, "metadata"?}

    P = {"text": str} | {"chat": [{"role": str, "content": str}, ...]};  R = {"text": str, "model_version"?: str}

Builders (``make_comparison`` ...) turn plain Python values into messages for callers such as the trainer,
the demo and the JSONL importer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.core.prompt_proto import make_prompt
from rlhf.v1 import common_pb2, feedback_pb2

KINDS = ("prompt", "demonstration", "comparison", "rating")
KIND_ENUM = {
    "prompt": feedback_pb2.RECORD_KIND_PROMPT,
    "demonstration": feedback_pb2.RECORD_KIND_DEMONSTRATION,
    "comparison": feedback_pb2.RECORD_KIND_COMPARISON,
    "rating": feedback_pb2.RECORD_KIND_RATING,
}
KIND_FROM_ENUM = {v: k for k, v in KIND_ENUM.items()}
ID_PREFIX = {"prompt": "pr", "demonstration": "dm", "comparison": "cmp", "rating": "rt"}
SPLIT_NAMES = {feedback_pb2.SPLIT_TRAIN: "train", feedback_pb2.SPLIT_EVAL: "eval"}
SPLIT_FROM_NAME = {"train": feedback_pb2.SPLIT_TRAIN, "eval": feedback_pb2.SPLIT_EVAL, "": 0, "all": 0}

PromptLike = str | Sequence[dict] | common_pb2.Prompt


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): the input of content hashes. (The same as
    ``json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))``, one encoder for all.)"""
    return _CANONICAL.encode(obj)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_id(kind: str, idempotency_key: str) -> str:
    """The stable id of a record: a hash of (kind, idempotency key), so a replay maps to the same id."""
    return f"{ID_PREFIX[kind]}_{sha256_hex(kind + chr(0) + idempotency_key)[:24]}"


def derived_prompt_key(prompt_payload: dict) -> str:
    """Idempotency key of a prompt record sent without one: the same prompt is stored once."""
    return "prompt:" + sha256_hex(canonical_json(prompt_payload))[:40]


def content_hash(payload: dict, labeler_id: str, prompt_id: str) -> str:
    """What must match for a replayed idempotency key to count as the same record: the SHA-256 of
    ``canonical_json({"p": payload, "l": labeler_id, "pid": prompt_id})``."""
    return content_hash_of_json(canonical_json(payload), labeler_id, prompt_id)


def content_hash_of_json(payload_json: str, labeler_id: str, prompt_id: str) -> str:
    """:func:`content_hash` from the payload's canonical JSON (the store encodes each payload once): the
    same bytes as the canonical JSON of the whole object, whose sorted keys are "l" < "p" < "pid"."""
    quote = json.encoder.encode_basestring  # = canonical_json of a str, without building an encoder
    return sha256_hex(f'{{"l":{quote(labeler_id)},"p":{payload_json},"pid":{quote(prompt_id)}}}')


# ---- proto -> payload -------------------------------------------------------------------------------------


def prompt_payload(prompt: common_pb2.Prompt) -> dict | None:
    which = prompt.WhichOneof("kind")
    if which == "text":
        return {"text": prompt.text}
    if which == "chat":
        return {"chat": [{"role": m.role, "content": m.content} for m in prompt.chat.messages]}
    return None


def response_payload(response: feedback_pb2.Response) -> dict:
    out = {"text": response.text}
    if response.model_version:
        out["model_version"] = response.model_version
    return out


def _with_optional(out: dict, record, *names: str) -> dict:
    for name in names:
        value = getattr(record, name)
        if value:
            out[name] = dict(value) if name == "metadata" else value
    return out


def prompt_record_payload(record: feedback_pb2.PromptRecord) -> dict:
    return _with_optional({"prompt": prompt_payload(record.prompt)}, record, "source", "metadata")


def demonstration_payload(record: feedback_pb2.Demonstration) -> dict:
    out = {"prompt": prompt_payload(record.prompt), "response": response_payload(record.response)}
    return _with_optional(out, record, "metadata")


def comparison_payload(record: feedback_pb2.Comparison) -> dict:
    out: dict[str, Any] = {
        "prompt": prompt_payload(record.prompt),
        "responses": [response_payload(r) for r in record.responses],
    }
    if record.HasField("chosen_index"):
        out["chosen_index"] = record.chosen_index
    if record.ranking:
        out["ranking"] = list(record.ranking)
    return _with_optional(out, record, "reason", "metadata")


def rating_payload(record: feedback_pb2.Rating, scale: tuple[float, float]) -> dict:
    out = {
        "prompt": prompt_payload(record.prompt),
        "response": response_payload(record.response),
        "score": record.score,
        "scale": [scale[0], scale[1]],
    }
    return _with_optional(out, record, "reason", "metadata")


# ---- payload -> proto -------------------------------------------------------------------------------------


def timestamp_from_us(us: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(us)
    return ts


def timestamp_to_us(ts: Timestamp) -> int:
    return ts.ToMicroseconds()


def prompt_message(payload: dict | None) -> common_pb2.Prompt:
    if not payload:
        return common_pb2.Prompt()
    if "text" in payload:
        return common_pb2.Prompt(text=payload["text"])
    return common_pb2.Prompt(
        chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(**m) for m in payload["chat"]])
    )


def response_message(payload: dict) -> feedback_pb2.Response:
    return feedback_pb2.Response(text=payload["text"], model_version=payload.get("model_version", ""))


def record_message(
    kind: str,
    payload: dict,
    *,
    id: str,
    idempotency_key: str,
    labeler_id: str | None,
    prompt_id: str | None,
    created_at_us: int,
):
    """The ``rlhf.v1`` message of a stored record."""
    common = dict(
        id=id,
        idempotency_key=idempotency_key,
        prompt=prompt_message(payload.get("prompt")),
        metadata=payload.get("metadata", {}),
        created_at=timestamp_from_us(created_at_us),
    )
    if kind == "prompt":
        return feedback_pb2.PromptRecord(source=payload.get("source", ""), **common)
    extra = dict(labeler_id=labeler_id or "", prompt_id=prompt_id or "")
    if kind == "demonstration":
        return feedback_pb2.Demonstration(response=response_message(payload["response"]), **common, **extra)
    if kind == "comparison":
        ranking = payload.get("ranking", [])
        chosen = payload.get("chosen_index", ranking[0] if ranking else 0)
        return feedback_pb2.Comparison(
            responses=[response_message(r) for r in payload["responses"]],
            chosen_index=chosen,
            ranking=ranking,
            reason=payload.get("reason", ""),
            **common,
            **extra,
        )
    low, high = payload["scale"]
    return feedback_pb2.Rating(
        response=response_message(payload["response"]),
        score=payload["score"],
        scale=feedback_pb2.RatingScale(min=low, max=high),
        reason=payload.get("reason", ""),
        **common,
        **extra,
    )


# ---- builders for callers ---------------------------------------------------------------------------------


def make_demonstration(
    prompt: PromptLike,
    response: str,
    *,
    idempotency_key: str,
    labeler_id: str = "",
    model_version: str = "",
    metadata: dict[str, str] | None = None,
) -> feedback_pb2.Demonstration:
    return feedback_pb2.Demonstration(
        idempotency_key=idempotency_key,
        prompt=make_prompt(prompt),
        response=feedback_pb2.Response(text=response, model_version=model_version),
        labeler_id=labeler_id,
        metadata=metadata or {},
    )


def make_comparison(
    prompt: PromptLike,
    responses: Sequence[str],
    *,
    idempotency_key: str,
    chosen_index: int | None = None,
    ranking: Sequence[int] | None = None,
    labeler_id: str = "",
    model_versions: Sequence[str] | None = None,
    reason: str = "",
    metadata: dict[str, str] | None = None,
) -> feedback_pb2.Comparison:
    """A comparison of ``responses``; give ``chosen_index`` (the preferred one) and/or a full ``ranking``."""
    versions = list(model_versions or [""] * len(responses))
    message = feedback_pb2.Comparison(
        idempotency_key=idempotency_key,
        prompt=make_prompt(prompt),
        responses=[
            feedback_pb2.Response(text=t, model_version=v) for t, v in zip(responses, versions, strict=True)
        ],
        ranking=list(ranking or []),
        labeler_id=labeler_id,
        reason=reason,
        metadata=metadata or {},
    )
    if chosen_index is not None:
        message.chosen_index = chosen_index
    return message


def make_rating(
    prompt: PromptLike,
    response: str,
    score: float,
    *,
    idempotency_key: str,
    scale: tuple[float, float] | None = None,
    labeler_id: str = "",
    model_version: str = "",
    reason: str = "",
    metadata: dict[str, str] | None = None,
) -> feedback_pb2.Rating:
    message = feedback_pb2.Rating(
        idempotency_key=idempotency_key,
        prompt=make_prompt(prompt),
        response=feedback_pb2.Response(text=response, model_version=model_version),
        score=score,
        labeler_id=labeler_id,
        reason=reason,
        metadata=metadata or {},
    )
    if scale is not None:
        message.scale.CopyFrom(feedback_pb2.RatingScale(min=scale[0], max=scale[1]))
    return message


def make_filter(
    kinds: Sequence[str | int] = (),
    labeler_ids: Sequence[str] = (),
    created_after_us: int | None = None,
    created_before_us: int | None = None,
) -> feedback_pb2.RecordFilter:
    """A RecordFilter from kind names ("comparison") or enum values, labeler ids and microsecond times."""
    record_filter = feedback_pb2.RecordFilter(
        kinds=[KIND_ENUM[k] if isinstance(k, str) else k for k in kinds], labeler_ids=list(labeler_ids)
    )
    if created_after_us is not None:
        record_filter.created_after.CopyFrom(timestamp_from_us(created_after_us))
    if created_before_us is not None:
        record_filter.created_before.CopyFrom(timestamp_from_us(created_before_us))
    return record_filter


def make_export_request(
    *,
    snapshot: str = "",
    split: str | int = 0,
    kinds: Sequence[str | int] = (),
    labeler_ids: Sequence[str] = (),
    created_after_us: int | None = None,
    created_before_us: int | None = None,
    cursor: str = "",
    limit: int = 0,
) -> feedback_pb2.ExportRequest:
    return feedback_pb2.ExportRequest(
        filter=make_filter(kinds, labeler_ids, created_after_us, created_before_us),
        snapshot=snapshot,
        split=SPLIT_FROM_NAME[split] if isinstance(split, str) else split,
        cursor=cursor,
        limit=limit,
    )


def exported_record(response: feedback_pb2.ExportResponse):
    """The record message inside an ExportResponse (PromptRecord, Demonstration, Comparison or Rating)."""
    return getattr(response, response.WhichOneof("record"))


def exported_kind(response: feedback_pb2.ExportResponse) -> str:
    return {
        "prompt": "prompt",
        "demonstration": "demonstration",
        "comparison": "comparison",
        "rating": "rating",
    }[response.WhichOneof("record")]


def prompt_value(prompt: common_pb2.Prompt) -> str | list[dict]:
    """A Prompt as plain Python: its text, or a list of {"role", "content"} dicts."""
    if prompt.WhichOneof("kind") == "chat":
        return [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
    return prompt.text
