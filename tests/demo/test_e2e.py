"""The demo end to end through the real services as processes: the tiny preset (a tiny random model) and a
real SmolLM2 run of a few PPO iterations. Both run the ``rlhf demo`` command in a subprocess, like a user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_demo_command(run_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "demo", "--run-dir", str(run_dir), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def service_pids(run_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (run_dir / "services").glob("*.ports.json")]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def check_run(run_dir: Path, proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((run_dir / "results.json").read_text())
    report = run_dir / "report.md"
    assert str(report) in proc.stdout  # the paths are printed at the end
    text = report.read_text()
    for png in ("ppo_curves.png", "gold_distributions.png", "rm_vs_gold.png"):
        assert (run_dir / png).read_bytes()[:8] == PNG_MAGIC
        assert png in text
    assert set(results["evals"]) == {"base", "SFT", "PPO"}
    k = results["eval_samples"]  # samples per eval prompt and policy
    n = len(results["eval_prompts"]) * k
    for e in results["evals"].values():
        assert len(e["gold"]) == len(e["texts"]) == n
        assert all(-2.0 <= g <= 1.0 for g in e["gold"])
    assert 0.0 <= results["win_rate"]["rate"] <= 1.0
    assert results["win_rate"]["n"] == len(results["eval_prompts"])
    assert len(results["evals"]["PPO"]["kl"]) == n
    rm = results["reward_model"]
    assert rm["eval_comparisons"] > 0 and 0.5 <= rm["bayes_optimal_accuracy"] <= 1.0
    # the held-out comparisons split by how many replies were cut off, each part with its own Bayes optimum
    kinds = rm["by_pair_kind"]
    assert kinds and sum(part["comparisons"] for part in kinds.values()) == rm["eval_comparisons"]
    assert all(0.5 <= part["bayes_optimal_accuracy"] <= 1.0 for part in kinds.values())
    # the win rate split by the SFT reply: the pairs are all prompts' PPO x SFT sample pairs
    split = results["win_rate"]["by_sft_reply"]
    assert sum(part["pairs"] for part in split.values()) == len(results["eval_prompts"]) * k * k
    assert "By the SFT reply" in text and "| held-out pairs |" in text
    # the trainers' metrics history feeds the PPO plot
    assert (run_dir / "ppo" / "metrics.jsonl").exists()
    # every service the demo started is gone
    pids = service_pids(run_dir)
    assert len(pids) == 3
    assert not [p for p in pids if pid_alive(p)]
    return results


def check_checkpoints_load(results: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    ckpt = results["checkpoints"]
    for name in ("SFT", "PPO"):
        AutoModelForCausalLM.from_pretrained(ckpt[name])
        AutoTokenizer.from_pretrained(ckpt[name])
        assert str(ckpt[name]).startswith(str(Path(results["checkpoints"]["SFT"]).parents[1]))
    rm = AutoModelForSequenceClassification.from_pretrained(ckpt["reward model"])
    assert rm.config.num_labels == 1


# The deadlines are generous: on a dedicated 2-core machine the tiny run takes about a minute and the quick one a
# few, but these tests must not fail because other work shares the machine.
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_preset_end_to_end_through_the_services(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_demo_command(run_dir, "--preset", "tiny", timeout=1100)
    results = check_run(run_dir, proc)
    check_checkpoints_load(results)
    assert results["preset"] == "tiny"
    # the simulated people wrote through the store
    assert results["feedback"]["comparisons"] > 0 and results["feedback"]["ratings"] > 0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_smollm2_quick_run_writes_loadable_checkpoints_and_a_report(tmp_path):
    from rlhf.core.models import default_model_dir

    if not (default_model_dir() / "model.safetensors").exists():
        try:
            from rlhf.core.models import resolve_model_path

            resolve_model_path("default")
        except FileNotFoundError as exc:
            pytest.skip(f"the built-in SmolLM2 is not available: {exc}")
    run_dir = tmp_path / "run"
    proc = run_demo_command(run_dir, "--preset", "quick", timeout=2300)
    results = check_run(run_dir, proc)
    check_checkpoints_load(results)
    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) >= 3


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_every_service_the_demo_started(tmp_path, signame):
    import signal
    import time

    sig = signal.Signals[signame]

    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlhf.cli",
            "demo",
            "--preset",
            "tiny",
            "--run-dir",
            str(run_dir),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # a test run in the background of a non-interactive shell inherits SIGINT ignored (and a Python
        # child keeps ignoring it): give the demo the default disposition an interactive terminal gives it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # wait until the three services are up and the labelers are at work, then press Ctrl-C
        deadline = time.monotonic() + 600
        while (run_dir / "feedback.db").exists() is False or len(service_pids(run_dir)) < 3:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the demo did not start its services"
            time.sleep(0.5)
        pids = service_pids(run_dir)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig.value, out  # as a process killed by the signal
    assert "Report:" not in out
    assert not [p for p in pids if pid_alive(p)]
    # one line saying where it stopped and where the partial run is, no traceback
    assert "Traceback" not in out, out
    assert "stopped during the " in out and f"({signame})" in out and str(run_dir) in out, out
