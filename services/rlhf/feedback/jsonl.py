"""JSONL import and export in the dataset formats of the Hugging Face ecosystem (TRL's formats).

One JSON object per line; the record kind follows from the fields present:

======================  =====================================================================================
kind                    fields (``P`` = prompt text or a list of {"role", "content"}; optional in [brackets])
======================  =====================================================================================
comparison (pair)       prompt, chosen, rejected, [chosen_model_version, rejected_model_version, reason]
comparison (k-way)      prompt, responses (list), chosen_index and/or ranking, [model_versions, reason]
demonstration           prompt, completion, [model_version]   — or —   messages, [model_version]
rating                  prompt, completion, score, [scale ([min, max], default [1, 7]), model_version, reason]
prompt                  prompt, [source]
every kind              [labeler_id, metadata ({str: str}), idempotency_key]
======================  =====================================================================================

``chosen``/``rejected``/``completion``/``responses[i]`` are text, or (conversational format) a list holding
one {"role": "assistant", "content": ...} message. The implicit-prompt preference format (``chosen`` and
``rejected`` full conversations with no ``prompt``) is accepted: the shared leading turns become the prompt.
Any other field is an error naming the line.

Export writes the canonical form: the fields in the order above, optional ones only when set; completions
as text for a text prompt and as an assistant message for a chat prompt; demonstrations with a chat prompt
as ``messages``; a two-response comparison as chosen/rejected. A line imported without ``idempotency_key``
gets one derived from its content (so re-importing a file creates nothing new), and export leaves such a
derived key out again: a file in canonical form round-trips through import and export unchanged.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from rlhf.core.errors import InvalidArgument, ServiceError
from rlhf.core.prompt_proto import make_prompt
from rlhf.feedback import records as rec
from rlhf.feedback.validation import CHECK_RECORD, DEFAULT_SCALE, Limits
from rlhf.v1 import feedback_pb2

COMMON = ("labeler_id", "metadata", "idempotency_key")
FIELDS = {
    "pair": (
        "prompt",
        "chosen",
        "rejected",
        "chosen_model_version",
        "rejected_model_version",
        "reason",
        *COMMON,
    ),
    "kway": ("prompt", "responses", "chosen_index", "ranking", "model_versions", "reason", *COMMON),
    "completion": ("prompt", "completion", "model_version", *COMMON),
    "messages": ("messages", "model_version", *COMMON),
    "rating": ("prompt", "completion", "score", "scale", "model_version", "reason", *COMMON),
    "prompt": ("prompt", "source", "metadata", "idempotency_key"),
}
_BATCH_FIELD = re.compile(r"^(labelers|prompts|demonstrations|comparisons|ratings)\[(\d+)\]")


class LineError(InvalidArgument):
    """A line of a JSONL file that cannot be imported."""


@dataclass
class ParsedLine:
    kind: str  # prompt | demonstration | comparison | rating
    message: Any  # the rlhf.v1 record message
    line_no: int


# ---- parsing ----------------------------------------------------------------------------------------------


def _layout(obj: dict) -> str:
    if "chosen" in obj or "rejected" in obj:
        return "pair"
    if "responses" in obj:
        return "kway"
    if "messages" in obj:
        return "messages"
    if "score" in obj:
        return "rating"
    if "completion" in obj:
        return "completion"
    if "prompt" in obj:
        return "prompt"
    raise ValueError(
        f"cannot tell the record kind from fields {sorted(obj)[:10]}: expected prompt/chosen/rejected, "
        "prompt/completion, messages, prompt/completion/score or prompt"
    )


def _string(value, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {type(value).__name__}")
    return value


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name}: expected a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"{name}[{i}]: expected an object with 'role' and 'content'")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise ValueError(f"{name}[{i}]: unknown field {unknown[0]!r} (allowed: role, content)")
        if "role" not in message or "content" not in message:
            raise ValueError(f"{name}[{i}]: needs 'role' and 'content'")
        out.append(
            {
                "role": _string(message["role"], f"{name}[{i}].role"),
                "content": _string(message["content"], f"{name}[{i}].content"),
            }
        )
    return out


def _prompt(value, name: str = "prompt") -> str | list[dict]:
    return value if isinstance(value, str) else _messages(value, name)


def _completion(value, name: str) -> str:
    """A completion: text, or a list with exactly one assistant message."""
    if isinstance(value, str):
        return value
    messages = _messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"{name}: expected text or a list with one 'assistant' message")
    return messages[0]["content"]


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a number")
    return float(value)


def _index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**32:
        raise ValueError(f"{name}: expected a non-negative integer")
    return value


def _common(obj: dict) -> dict:
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata: expected an object of string values")
    return dict(
        labeler_id=_string(obj.get("labeler_id", ""), "labeler_id"),
        metadata=metadata,
    )


def _implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise ValueError("chosen/rejected without 'prompt': conversations must share all turns but the last")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise ValueError(f"{name}: the last turn must be an 'assistant' message")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _parse_prompt(obj: dict, key: str, default_source: str) -> feedback_pb2.PromptRecord:
    return feedback_pb2.PromptRecord(
        idempotency_key=key,
        prompt=make_prompt(_prompt(obj["prompt"])),
        source=_string(obj.get("source", default_source), "source"),
        metadata=_common(obj)["metadata"],
    )


def _parse_pair(obj: dict, key: str, common: dict) -> feedback_pb2.Comparison:
    """A chosen/rejected preference (explicit prompt, or implicit: the conversations' shared turns)."""
    if "chosen" not in obj or "rejected" not in obj:
        raise ValueError("a preference needs both 'chosen' and 'rejected'")
    if "prompt" in obj:
        prompt = _prompt(obj["prompt"])
        chosen, rejected = _completion(obj["chosen"], "chosen"), _completion(obj["rejected"], "rejected")
    else:
        prompt, chosen, rejected = _implicit_prompt(
            _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
        )
    versions = [
        _string(obj.get("chosen_model_version", ""), "chosen_model_version"),
        _string(obj.get("rejected_model_version", ""), "rejected_model_version"),
    ]
    return rec.make_comparison(
        prompt,
        [chosen, rejected],
        chosen_index=0,
        model_versions=versions,
        idempotency_key=key,
        reason=_string(obj.get("reason", ""), "reason"),
        **common,
    )


def _parse_kway(obj: dict, key: str, common: dict) -> feedback_pb2.Comparison:
    """A comparison of k responses: ``chosen_index`` and/or ``ranking``."""
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise ValueError("responses: expected a list")
    texts = [_completion(r, f"responses[{i}]") for i, r in enumerate(responses)]
    if "chosen_index" not in obj and "ranking" not in obj:
        raise ValueError("a k-way comparison needs 'chosen_index' or 'ranking'")
    ranking = obj.get("ranking")
    if ranking is not None and not isinstance(ranking, list):
        raise ValueError("ranking: expected a list of indices")
    versions = obj.get("model_versions", [""] * len(texts))
    if not isinstance(versions, list) or len(versions) != len(texts):
        raise ValueError("model_versions: expected one string per response")
    return rec.make_comparison(
        _prompt(obj["prompt"]),
        texts,
        chosen_index=_index(obj["chosen_index"], "chosen_index") if "chosen_index" in obj else None,
        ranking=[_index(r, f"ranking[{i}]") for i, r in enumerate(ranking or [])],
        model_versions=[_string(v, f"model_versions[{i}]") for i, v in enumerate(versions)],
        idempotency_key=key,
        reason=_string(obj.get("reason", ""), "reason"),
        **common,
    )


def _parse_messages(obj: dict, key: str, common: dict, model_version: str) -> feedback_pb2.Demonstration:
    messages = _messages(obj["messages"], "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError("messages: needs a prompt turn and a final 'assistant' turn")
    return rec.make_demonstration(
        messages[:-1], messages[-1]["content"], idempotency_key=key, model_version=model_version, **common
    )


def _parse_rating(obj: dict, key: str, common: dict, model_version: str) -> feedback_pb2.Rating:
    prompt, completion = _prompt(obj["prompt"]), _completion(obj["completion"], "completion")
    scale = obj.get("scale", list(DEFAULT_SCALE))
    if not isinstance(scale, list) or len(scale) != 2:
        raise ValueError("scale: expected [min, max]")
    return rec.make_rating(
        prompt,
        completion,
        _number(obj["score"], "score"),
        scale=(_number(scale[0], "scale[0]"), _number(scale[1], "scale[1]")),
        idempotency_key=key,
        model_version=model_version,
        reason=_string(obj.get("reason", ""), "reason"),
        **common,
    )


def parse_record(obj: Any, *, default_labeler_id: str = "", default_source: str = "") -> tuple[str, Any]:
    """(kind, message) of one JSONL object; ValueError with a clear message if it does not fit a format."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    layout = _layout(obj)
    unknown = [k for k in obj if k not in FIELDS[layout]]
    if unknown:
        raise ValueError(
            f"unknown field {unknown[0]!r} for this format (allowed: {', '.join(FIELDS[layout])})"
        )
    key = _string(obj.get("idempotency_key", ""), "idempotency_key")
    if layout == "prompt":
        return "prompt", _parse_prompt(obj, key, default_source)
    common = _common(obj)
    common["labeler_id"] = common["labeler_id"] or default_labeler_id
    if layout == "pair":
        return "comparison", _parse_pair(obj, key, common)
    if "prompt" not in obj and layout != "messages":
        raise ValueError("missing 'prompt'")
    if layout == "kway":
        return "comparison", _parse_kway(obj, key, common)
    model_version = _string(obj.get("model_version", ""), "model_version")
    if layout == "messages":
        return "demonstration", _parse_messages(obj, key, common, model_version)
    if layout == "completion":
        prompt, completion = _prompt(obj["prompt"]), _completion(obj["completion"], "completion")
        message = rec.make_demonstration(
            prompt, completion, idempotency_key=key, model_version=model_version, **common
        )
        return "demonstration", message
    return "rating", _parse_rating(obj, key, common, model_version)


def derived_key(kind: str, line: dict) -> str:
    """Idempotency key of a line imported without one: a hash of its canonical content."""
    return f"jsonl:{kind}:" + rec.sha256_hex(rec.canonical_json(line))[:32]


def read_jsonl(
    lines: Iterable[str], *, default_labeler_id: str = "", default_source: str = ""
) -> list[ParsedLine]:
    """Parse every line (blank lines skipped); the first bad line raises :class:`LineError`."""
    out = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LineError(f"line {line_no}", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        try:
            kind, message = parse_record(
                obj, default_labeler_id=default_labeler_id, default_source=default_source
            )
        except ValueError as exc:
            raise LineError(f"line {line_no}", str(exc)) from None
        if kind != "prompt" and not message.idempotency_key:
            message.idempotency_key = derived_key(kind, record_line(kind, message, with_key=False))
        out.append(ParsedLine(kind, message, line_no))
    return out


# ---- export -----------------------------------------------------------------------------------------------


def _number_out(x: float) -> int | float:
    return int(x) if math.isfinite(x) and x.is_integer() and abs(x) < 2**53 else x


def record_line(kind: str, message, *, with_key: bool = True) -> dict:
    """The canonical JSONL object of a record message."""
    prompt = rec.prompt_value(message.prompt)
    chat = isinstance(prompt, list)

    def completion(text: str):
        return [{"role": "assistant", "content": text}] if chat else text

    line: dict[str, Any] = {}
    if kind == "prompt":
        line["prompt"] = prompt
        if message.source:
            line["source"] = message.source
    elif kind == "comparison":
        responses = list(message.responses)
        if len(responses) == 2:
            chosen = message.chosen_index
            line["prompt"] = prompt
            line["chosen"] = completion(responses[chosen].text)
            line["rejected"] = completion(responses[1 - chosen].text)
            if responses[chosen].model_version:
                line["chosen_model_version"] = responses[chosen].model_version
            if responses[1 - chosen].model_version:
                line["rejected_model_version"] = responses[1 - chosen].model_version
        else:
            line["prompt"] = prompt
            line["responses"] = [completion(r.text) for r in responses]
            if message.ranking:
                line["ranking"] = list(message.ranking)
            else:
                line["chosen_index"] = message.chosen_index
            if any(r.model_version for r in responses):
                line["model_versions"] = [r.model_version for r in responses]
        if message.reason:
            line["reason"] = message.reason
    elif kind == "demonstration":
        if chat:
            line["messages"] = [*prompt, {"role": "assistant", "content": message.response.text}]
        else:
            line["prompt"] = prompt
            line["completion"] = message.response.text
        if message.response.model_version:
            line["model_version"] = message.response.model_version
    else:
        line["prompt"] = prompt
        line["completion"] = completion(message.response.text)
        line["score"] = _number_out(message.score)
        scale = (message.scale.min, message.scale.max) if message.HasField("scale") else DEFAULT_SCALE
        if tuple(scale) != DEFAULT_SCALE:
            line["scale"] = [_number_out(scale[0]), _number_out(scale[1])]
        if message.response.model_version:
            line["model_version"] = message.response.model_version
        if message.reason:
            line["reason"] = message.reason
    if kind != "prompt" and message.labeler_id:
        line["labeler_id"] = message.labeler_id
    if message.metadata:
        line["metadata"] = dict(sorted(message.metadata.items()))
    if with_key and message.idempotency_key:
        if kind == "prompt":
            implicit = rec.derived_prompt_key(rec.prompt_payload(message.prompt))
        else:
            implicit = derived_key(kind, record_line(kind, message, with_key=False))
        if message.idempotency_key != implicit:
            line["idempotency_key"] = message.idempotency_key
    return line


def dumps_line(line: dict) -> str:
    """One JSONL line: compact separators, UTF-8 kept as is (like ``datasets.Dataset.to_json``)."""
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(responses: Iterable[feedback_pb2.ExportResponse], out: TextIO) -> int:
    """Write exported records as JSONL; returns how many lines were written."""
    n = 0
    for response in responses:
        out.write(dumps_line(record_line(rec.exported_kind(response), rec.exported_record(response))) + "\n")
        n += 1
    return n


# ---- import into a store or a server ----------------------------------------------------------------------

ADD_METHOD = {
    "prompt": "add_prompts",
    "demonstration": "add_demonstrations",
    "comparison": "add_comparisons",
    "rating": "add_ratings",
}


@dataclass
class ImportSummary:
    lines: int = 0
    created: int = 0
    existing: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class ImportFailed(Exception):
    """A batch was refused; ``message`` names the file's line; ``code`` is the gRPC status name."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def _runs(parsed: list[ParsedLine], batch_size: int) -> Iterator[list[ParsedLine]]:
    """Consecutive lines of one kind, at most batch_size at a time (keeps the file's order in the store)."""
    batch: list[ParsedLine] = []
    for item in parsed:
        if batch and (item.kind != batch[0].kind or len(batch) >= batch_size):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _with_line(message: str, batch: list[ParsedLine]) -> str:
    match = _BATCH_FIELD.match(message)
    if match and int(match.group(2)) < len(batch):
        return f"line {batch[int(match.group(2))].line_no}: {message}"
    return message


# A server's text limit is its own (max_text_chars); the other limits are the contract's, the same everywhere.
CONTRACT_LIMITS = Limits(max_text_chars=sys.maxsize, max_batch_size=sys.maxsize)


def check_lines(parsed: list[ParsedLine], limits: Limits = CONTRACT_LIMITS) -> None:
    """Validate every line as the store will, before anything is written; the first bad one raises
    :class:`LineError` naming its line and field."""
    for item in parsed:
        try:
            CHECK_RECORD[item.kind](item.message, item.kind, limits)
        except ServiceError as exc:
            raise LineError(f"line {item.line_no}", exc.message) from None


def import_records(parsed: list[ParsedLine], sink, batch_size: int = 1000) -> ImportSummary:
    """Write parsed lines to ``sink`` (a FeedbackStore or a FeedbackClient): atomic, idempotent batches.

    Every line is validated first (with the store's limits, or the contract's for a server), so that a bad
    line anywhere in the file writes nothing; only what needs the database (a conflicting idempotency key,
    an unknown prompt id) or a server's own text limit can stop an import after some batches, and re-running
    the import after fixing the line then completes it without duplicates.
    """
    check_lines(parsed, getattr(sink, "limits", None) or CONTRACT_LIMITS)
    summary = ImportSummary(lines=len(parsed))
    for batch in _runs(parsed, batch_size):
        kind = batch[0].kind
        try:
            result = getattr(sink, ADD_METHOD[kind])([p.message for p in batch])
        except ServiceError as exc:
            raise ImportFailed(_with_line(exc.message, batch), exc.code.name) from None
        except grpc.RpcError as exc:
            raise ImportFailed(_with_line(exc.details() or "", batch), exc.code().name) from None
        summary.created += result.created
        summary.existing += result.existing
        summary.by_kind[kind] = summary.by_kind.get(kind, 0) + len(batch)
    return summary
