"""Where labeling tasks come from: a JSONL file of tasks, or responses sampled from the policy for stored
prompts that have no task yet."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa

from rlhf.core.errors import InvalidArgument
from rlhf.feedback import records as rec
from rlhf.feedback.schema import labeling_tasks as tasks
from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.tasks import TaskSpec

TASK_FIELDS = ("prompt", "responses", "response", "idempotency_key", "redundancy", "source", "metadata")


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str) and not (
        isinstance(prompt, list)
        and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in prompt)
    ):
        raise ValueError("'prompt' must be text or a list of {'role', 'content'} messages")


def parse_task_line(obj, *, default_source: str = "") -> TaskSpec:
    """One JSONL task: ``{"prompt": P, "responses": [R, ...]}`` (compare) or ``{"prompt": P, "response": R}``
    (rate), optional ``idempotency_key``, ``redundancy``, ``source``, ``metadata``. P is text or a list of
    {"role", "content"}; R is text or {"text", "model_version"}."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(obj) - set(TASK_FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; a task has {', '.join(TASK_FIELDS)}")
    if "prompt" not in obj:
        raise ValueError("'prompt' is required")
    if ("responses" in obj) == ("response" in obj):
        raise ValueError("give 'responses' (a list, to compare) or 'response' (one, to rate)")
    responses = obj["responses"] if "responses" in obj else [obj["response"]]
    if not isinstance(responses, list):
        raise ValueError("'responses' must be a list")
    _check_prompt(obj["prompt"])
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("'metadata' must map strings to strings")
    redundancy = obj.get("redundancy")
    if redundancy is not None and (not isinstance(redundancy, int) or isinstance(redundancy, bool)):
        raise ValueError("'redundancy' must be a whole number")
    return TaskSpec(
        prompt=obj["prompt"],
        responses=responses,
        idempotency_key=str(obj.get("idempotency_key", "")),
        redundancy=redundancy,
        source=str(obj.get("source", default_source)),
        metadata=metadata,
    )


def read_task_jsonl(lines, *, default_source: str = "") -> list[TaskSpec]:
    """Parse a JSONL file of tasks; the first bad line raises InvalidArgument naming it."""
    out = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            out.append(parse_task_line(json.loads(text), default_source=default_source))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"line {line_no}", f"not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise InvalidArgument(f"line {line_no}", str(exc)) from None
    return out


def prompts_without_tasks(store: FeedbackStore, limit: int = 0) -> list[tuple[str, str | list[dict]]]:
    """Stored prompt records (id, prompt) that no labeling task uses yet, oldest first."""
    with store.read_connection() as conn:
        used = set(conn.execute(sa.select(tasks.c.prompt_id).where(tasks.c.prompt_id.is_not(None))).scalars())
    out = []
    for response in store.export(kinds=["prompt"]):
        record = response.prompt
        if record.id in used:
            continue
        out.append((record.id, rec.prompt_value(record.prompt)))
        if limit and len(out) >= limit:
            break
    return out


def _distinct_responses(samples) -> tuple[list[str], list[str]]:
    """(texts, policy versions) of one prompt's samples in sample order, identical texts merged."""
    texts, versions = [], []
    for sample in sorted(samples, key=lambda s: s.sample_index):
        text = sample.text.strip()
        if text and text not in texts:
            texts.append(text)
            versions.append(str(sample.policy_version))
    return texts, versions


def sample_tasks(
    client,
    prompts: Sequence[tuple[str, str | list[dict]]],
    *,
    responses: int = 2,
    batch_size: int = 8,
    source: str = "generation",
    **generate_kw,
) -> tuple[list[TaskSpec], int]:
    """Tasks from ``responses`` samples per stored prompt, drawn with a PolicyClient-like ``client``
    (``generate(prompts, n=..., **generate_kw)`` -> samples ordered by prompt then sample).

    Identical samples are merged; a prompt left with fewer distinct responses than asked for (e.g. one when
    two were wanted) is dropped. Returns (tasks, prompts dropped).
    """
    specs, dropped = [], 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        samples = client.generate([p for _, p in chunk], n=responses, **generate_kw)
        by_prompt: dict[int, list] = defaultdict(list)
        for sample in samples:
            by_prompt[sample.prompt_index].append(sample)
        for i, (prompt_id, prompt) in enumerate(chunk):
            texts, versions = _distinct_responses(by_prompt[i])
            if len(texts) < min(responses, 2) or not texts:
                dropped += 1
                continue
            specs.append(
                TaskSpec(
                    prompt=prompt,
                    responses=[
                        {"text": t, "model_version": f"policy-v{v}"}
                        for t, v in zip(texts, versions, strict=True)
                    ],
                    idempotency_key=f"sampled:{prompt_id}:" + rec.sha256_hex(rec.canonical_json(texts))[:16],
                    source=source,
                    prompt_id=prompt_id,
                )
            )
    return specs, dropped
