"""``rlhf feedback enqueue --sample-from``: responses sampled by a real generation service (tiny random model)
for the prompts in the store become labeling tasks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf.core.launcher import Launcher
from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.queue import LabelingQueue
from rlhf.labeling.sources import prompts_without_tasks
from rlhf.v1 import feedback_pb2

pytest.importorskip("rlhf.generation.client")


@pytest.mark.slow  # starts a generation service (torch) and runs the CLI twice
def test_enqueue_samples_two_responses_per_stored_prompt(tmp_path, tiny_lm_path):
    url = f"sqlite:///{tmp_path}/feedback.db"
    with FeedbackStore(url) as store:
        prompt_ids = store.add_prompts(
            [feedback_pb2.PromptRecord(prompt={"text": f"Tell me about the number {i}."}) for i in range(3)]
        ).ids
    with Launcher(tmp_path / "services", env={"RLHF_TORCH_THREADS": "1"}) as launcher:
        generation = launcher.start(
            "generation", ["serve", "generation"], args=["--model", str(tiny_lm_path)], timeout=300
        )
        argv = [sys.executable, "-m", "rlhf.cli", "feedback", "enqueue", "--sample-from", generation.target]
        argv += ["--responses", "2", "--max-new-tokens", "12", "--seed", "7", "--database-url", url]
        argv += ["--redundancy", "2"]
        first = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "every stored prompt already has a labeling task" in again.stderr
    with FeedbackStore(url, migrate=False) as store:
        queue = LabelingQueue(store)
        tasks = []
        while (task := queue.next_task("ann")) is not None:
            tasks.append(task)
            queue.skip(task.id, "ann")
        queued = len(tasks)
        assert f"queued {queued} new tasks" in first.stderr
        assert queued >= 2  # a prompt is dropped only when both samples came out identical
        for task in tasks:
            assert task.kind == "comparison" and len(task.responses) == 2 and task.redundancy == 2
            assert task.prompt_id in prompt_ids
            assert all(r["model_version"] == "policy-v0" for r in task.responses)
        assert len(prompts_without_tasks(store)) == 3 - queued  # dropped prompts stay available
