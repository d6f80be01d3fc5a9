"""What the labeling queue holds: tasks (a prompt with responses to compare or rate), labelers' judgments of
them, and the checks a task passes before it is queued."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.core.errors import InvalidArgument
from rlhf.core.prompt_proto import make_prompt
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val

RATING_SCALE = (1, 7)
MAX_REDUNDANCY = 100
SOURCE = "labeling"


@dataclass
class TaskSpec:
    """A task to enqueue: a prompt (text or chat messages) and 1 (rate) or 2+ (compare) responses."""

    prompt: str | list[dict]
    responses: list[str | dict]  # text, or {"text": ..., "model_version": ...}
    idempotency_key: str = ""  # default: derived from the prompt and responses
    redundancy: int | None = None  # default: the queue's
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    prompt_id: str = ""  # a stored prompt record this task's prompt is (default: stored on enqueue)


@dataclass
class Task:
    id: str
    kind: str  # "comparison" | "rating"
    prompt: dict  # {"text": ...} | {"chat": [...]}
    responses: list[dict]  # [{"text", "model_version"?}, ...]
    prompt_id: str | None
    redundancy: int
    judgments: int
    source: str
    metadata: dict[str, str]
    lease_expires_us: int = 0

    @property
    def prompt_value(self) -> str | list[dict]:
        return self.prompt.get("text", self.prompt.get("chat"))


@dataclass
class Judgment:
    """A labeler's answer. Comparisons: ``chosen_index`` and/or a full ``ranking`` (best first), optional
    ``score`` (1-7) of the chosen response. Ratings: ``score`` (1-7, required)."""

    task_id: str
    labeler_id: str
    chosen_index: int | None = None
    ranking: list[int] | None = None
    score: int | None = None
    reason: str = ""


@dataclass
class SubmitResult:
    record_ids: list[str]
    created: bool  # False: this judgment was already stored (a replay)
    seconds: float | None  # time from assignment to the first submit (None for a replay)
    created_by_kind: dict[str, int] = field(default_factory=dict)  # records newly stored, by kind


@dataclass
class EnqueueResult:
    ids: list[str]
    created: int
    existing: int


@dataclass
class CheckedTask:
    """A validated :class:`TaskSpec`: its idempotency key, the payload stored with it, its redundancy."""

    key: str
    payload: dict
    redundancy: int


def task_id_for(key: str) -> str:
    return "task_" + rec.sha256_hex("task\0" + key)[:24]


def judgment_key(task_id: str, labeler_id: str) -> str:
    """The idempotency key of a labeler's judgment of a task (its comparison and its rating)."""
    return f"labeling:{task_id}:{labeler_id}"


def task_from_row(row, lease_expires_us: int = 0) -> Task:
    payload = row["payload"]
    return Task(
        id=row["id"],
        kind=row["kind"],
        prompt=payload["prompt"],
        responses=payload["responses"],
        prompt_id=row["prompt_id"],
        redundancy=row["redundancy"],
        judgments=row["judgments"],
        source=row["source"],
        metadata=payload.get("metadata", {}),
        lease_expires_us=lease_expires_us,
    )


def _response(value, field_name: str) -> dict:
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        extra = set(value) - {"text", "model_version"}
        if extra:
            raise InvalidArgument(field_name, f"unknown fields {sorted(extra)}")
        out = {"text": value["text"]}
        if value.get("model_version"):
            out["model_version"] = str(value["model_version"])
        return out
    raise InvalidArgument(field_name, "a response is text or {'text': ..., 'model_version': ...}")


def _check_responses(spec: TaskSpec, path: str, limits: val.Limits) -> list[dict]:
    if not isinstance(spec.responses, list | tuple) or not spec.responses:
        raise val.RecordError(f"{path}.responses", "give 1 response to rate or 2+ to compare", "bad_task")
    if len(spec.responses) > limits.max_responses:
        raise val.RecordError(
            f"{path}.responses",
            f"{len(spec.responses)} responses > limit {limits.max_responses}",
            "too_many_responses",
        )
    responses = [_response(r, f"{path}.responses[{j}]") for j, r in enumerate(spec.responses)]
    seen: dict[str, int] = {}
    for j, r in enumerate(responses):
        val.check_response(rec.response_message(r), f"{path}.responses[{j}]", limits)
        if r["text"] in seen:
            raise val.RecordError(
                f"{path}.responses[{j}].text", f"identical to responses[{seen[r['text']]}]", "bad_task"
            )
        seen[r["text"]] = j
    return responses


def check_task(spec: TaskSpec, i: int, limits: val.Limits, default_redundancy: int) -> CheckedTask:
    """Validate ``tasks[i]``; raises a RecordError / InvalidArgument naming the field."""
    path = f"tasks[{i}]"
    prompt = make_prompt(spec.prompt)
    val.check_prompt(prompt, f"{path}.prompt", limits)
    responses = _check_responses(spec, path, limits)
    redundancy = default_redundancy if spec.redundancy is None else spec.redundancy
    if not isinstance(redundancy, int) or not 1 <= redundancy <= MAX_REDUNDANCY:
        raise val.RecordError(f"{path}.redundancy", f"{redundancy!r} not in 1..{MAX_REDUNDANCY}", "bad_task")
    val.check_key(spec.idempotency_key, f"{path}.idempotency_key", limits, required=False)
    val.check_string(spec.source, f"{path}.source", limits.max_short_chars, required=False)
    val.check_metadata(spec.metadata, f"{path}.metadata", limits)
    payload = {"prompt": rec.prompt_payload(prompt), "responses": responses}
    if spec.metadata:
        payload["metadata"] = dict(spec.metadata)
    key = spec.idempotency_key or "task:" + rec.sha256_hex(rec.canonical_json(payload))[:40]
    return CheckedTask(key, payload, redundancy)
