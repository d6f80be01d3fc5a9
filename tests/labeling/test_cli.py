"""``rlhf feedback enqueue`` from a JSONL file: idempotent, bad lines named."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


@pytest.mark.skipif(shutil.which("rlhf") is None, reason="the rlhf console script is not installed")
def test_enqueue_from_the_command_line(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        json.dumps({"prompt": "Say hi.", "responses": ["Hi!", "Hello there."]})
        + "\n"
        + json.dumps(
            {"prompt": [{"role": "user", "content": "Rate me."}], "response": "Done.", "redundancy": 3}
        )
        + "\n"
    )
    url = f"sqlite:///{tmp_path}/f.db"
    for expected in ("queued 2 new tasks (0 already queued)", "queued 0 new tasks (2 already queued)"):
        out = subprocess.run(
            ["rlhf", "feedback", "enqueue", str(tasks), "--database-url", url, "--redundancy", "2"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert expected in out.stderr and "5 judgments now wanted" in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "responses": ["same", "same"]}\n')
    out = subprocess.run(
        ["rlhf", "feedback", "enqueue", str(bad), "--database-url", url], capture_output=True, text=True
    )
    assert out.returncode == 2 and "tasks[0].responses[1].text: identical to responses[0]" in out.stderr
