"""Task sources: JSONL task lines, and tasks sampled from the policy for stored prompts without a task."""

from __future__ import annotations

import pytest

from rlhf.core.errors import InvalidArgument
from rlhf.labeling.sources import parse_task_line, prompts_without_tasks, read_task_jsonl, sample_tasks
from rlhf.v1 import feedback_pb2


def exported(store, kind):
    return [getattr(r, kind) for r in store.export(kinds=[kind])]


def test_task_lines_parse_and_bad_lines_are_named():
    spec = parse_task_line(
        {"prompt": [{"role": "user", "content": "hi"}], "response": "hello", "redundancy": 3}
    )
    assert spec.responses == ["hello"] and spec.redundancy == 3
    with pytest.raises(InvalidArgument, match="line 2.*responses"):
        read_task_jsonl(['{"prompt": "a", "responses": ["x", "y"]}', '{"prompt": "b"}'])
    with pytest.raises(InvalidArgument, match="line 1.*unknown fields"):
        read_task_jsonl(['{"prompt": "a", "chosen": "x", "rejected": "y"}'])


class _Sample:
    def __init__(self, prompt_index, sample_index, text, policy_version=3):
        self.prompt_index, self.sample_index, self.text, self.policy_version = (
            prompt_index,
            sample_index,
            text,
            policy_version,
        )


class _RecordingPolicy:
    """Stands in for rlhf.generation.client.PolicyClient: returns fixed samples and records each call."""

    def __init__(self, texts_per_prompt):
        self.texts = texts_per_prompt
        self.calls = []

    def generate(self, prompts, *, n, **kw):
        self.calls.append((list(prompts), n, kw))
        start = sum(len(c[0]) for c in self.calls[:-1])
        return [
            _Sample(i, j, text)
            for i in range(len(prompts))
            for j, text in enumerate(self.texts[start + i][:n])
        ]


def test_sampled_tasks_come_from_stored_prompts_without_a_task(queue, store):
    result = store.add_prompts([feedback_pb2.PromptRecord(prompt={"text": f"prompt {i}"}) for i in range(3)])
    policy = _RecordingPolicy([["a", "b"], ["same", "same"], ["c", "d"]])
    prompts = prompts_without_tasks(store)
    assert [p for _, p in prompts] == ["prompt 0", "prompt 1", "prompt 2"]
    specs, dropped = sample_tasks(policy, prompts, responses=2, batch_size=2, max_new_tokens=16)
    assert dropped == 1  # two identical samples: nothing to compare
    assert [c[1] for c in policy.calls] == [2, 2] and policy.calls[0][2] == {"max_new_tokens": 16}
    queue.enqueue(specs)
    task = queue.next_task("ann")
    assert task.prompt_id == result.ids[0]
    assert task.responses == [
        {"text": "a", "model_version": "policy-v3"},
        {"text": "b", "model_version": "policy-v3"},
    ]
    assert [p for _, p in prompts_without_tasks(store)] == ["prompt 1"]
    assert len(exported(store, "prompt")) == 3  # no second copy of a stored prompt
