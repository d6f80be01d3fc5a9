"""`rlhf reward score` on a JSONL file, and the SDK retrying through a restart of a `rlhf serve reward` process."""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest

from rlhf.cli import main
from rlhf.core.client import RetryPolicy
from rlhf.core.launcher import Launcher
from rlhf.reward.client import RewardClient

LINES = [
    {"prompt": "Hello", "response": "Hi!"},
    {"prompt": [{"role": "user", "content": "Tell a story about a cat."}], "completion": "Once upon a time."},
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello there."}],
        "id": 7,
    },
    {
        "messages": [
            {"role": "user", "content": "Thank you"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    },
    {"prompt": "Give me advice.", "chosen": "Start with eggs.", "rejected": "No."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_scores_a_jsonl_file(server, client, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", LINES)
    out = tmp_path / "scores.jsonl"
    code = main(
        [
            "reward",
            "score",
            "--input",
            str(pairs),
            "--output",
            str(out),
            "--target",
            server.target,
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    assert "scoring" in capsys.readouterr().err  # the progress bar
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(LINES)
    expected = client.score(
        [
            ("Hello", "Hi!"),
            ([{"role": "user", "content": "Tell a story about a cat."}], "Once upon a time."),
            ([{"role": "user", "content": "Hi"}], "Hello there."),
            ([{"role": "user", "content": "Thank you"}], "You are welcome."),
            ("Give me advice.", "Start with eggs."),
            ("Give me advice.", "No."),
        ]
    )
    got = [r["score"] for r in rows[:4]] + [rows[4]["chosen_score"], rows[4]["rejected_score"]]
    assert got == pytest.approx(expected, abs=1e-5)  # other batch mates, other padding
    assert all(r["model_version"] == "tiny-v1" for r in rows)
    assert rows[0]["normalized_score"] == pytest.approx((rows[0]["score"] - 0.25) / 2.0)
    assert rows[2]["id"] == 7 and rows[4]["prompt"] == "Give me advice."


def test_cli_reports_bad_lines_and_bad_items(server, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [LINES[0], {"prompt": "x"}])
    assert main(["reward", "score", "--input", str(bad), "--target", server.target, "--no-progress"]) == 2
    assert f"{bad}:2: needs 'response'" in capsys.readouterr().err
    invalid = write_jsonl(tmp_path / "invalid.jsonl", [{"prompt": "", "response": "x"}])
    assert main(["reward", "score", "--input", str(invalid), "--target", server.target, "--no-progress"]) == 2
    assert "INVALID_ARGUMENT: items[0].pair.prompt.text: empty" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sdk_retries_through_a_server_restart(rm_with_stats, tmp_path, caplog):
    port = free_port()
    args = [
        "--model",
        str(rm_with_stats),
        "--port",
        str(port),
        "--torch-threads",
        "1",
        "--grace-seconds",
        "1",
    ]
    pairs = [("Hello", "Hi!"), ("Tell a story about a cat.", "Once upon a time.")]
    retry = RetryPolicy(retry_timeout=180, initial_backoff=0.1, max_backoff=1.0)
    with Launcher(tmp_path / "services") as launcher:
        launcher.start("reward", ["serve", "reward"], args=args)
        with RewardClient(f"127.0.0.1:{port}", retry=retry, timeout=20) as client:
            before = client.score(pairs)
            launcher.stop("reward")
            box: dict = {}

            def call():
                try:
                    box["scores"] = client.score(pairs)
                except Exception as exc:  # reported below
                    box["error"] = exc

            with caplog.at_level(logging.WARNING, logger="rlhf.client"):
                thread = threading.Thread(target=call)
                thread.start()  # the server is down: the call fails and retries
                launcher.start("reward", ["serve", "reward"], args=args)
                thread.join(180)
            assert not thread.is_alive() and "error" not in box, box
            assert box["scores"] == pytest.approx(before, abs=1e-6)
            assert any("UNAVAILABLE" in r.getMessage() for r in caplog.records)
