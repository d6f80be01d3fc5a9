"""Timing real PPO iterations through the services (``python -m rlhf.bench rl`` calls this).

``time_ppo_iterations`` starts the generation and reward services as processes (rlhf.core.launcher), runs
``rlhf train ppo`` as a third process for ``iterations`` iterations against them with the benchmark's settings
and reads the per-step wall time and per-phase times back from the run's metrics.jsonl. The first iteration is
warm-up (it also pushes the initial weights) and is left out of the medians.

Every process gets ``THREAD_ENV``: OpenMP threads that sleep instead of spinning when they wait. The three
processes take turns on the 2 cores, and on a shared machine a spinning 2-thread process was measured 3x slower
than a passive one (47 s vs 14 s for one forward under a load of 7); the baselines get the same setting.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf.core.launcher import Launcher
from rlhf.trainer.metrics import read_metrics

log = logging.getLogger("rlhf.bench.ppo_iteration")

PHASES = ("generate", "score", "reference", "values", "update", "sync")
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# every process of the run: offline, and the thread setting above
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **THREAD_ENV}
# the learning metrics of the last iteration that the result reports
LAST_METRICS = (
    "reward_mean",
    "kl",
    "entropy",
    "response_length",
    "logprob_mismatch_max",
    "logprob_mismatch_mean",
)


def _steady(rows: list[dict]) -> list[dict]:
    return rows[1:] if len(rows) > 1 else rows


def summarize(rows: list[dict], rollouts: int) -> dict:
    """Median seconds per iteration, rollouts/s and median seconds per phase from metrics.jsonl rows.

    ``idle`` is what no named phase covers: the step's wall time minus the phases (prompt selection, rollout
    packing, logging, the job shell's bookkeeping).
    """
    steady = _steady(rows)
    seconds = statistics.median(r["step_seconds"] for r in steady)
    phases = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in steady) for p in PHASES}
    idle = [r["step_seconds"] - sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in steady]
    phases["idle"] = statistics.median(idle)
    return {
        "seconds_per_iteration": seconds,
        "rollouts_per_second": rollouts / seconds,
        "rollouts_per_step": rollouts,
        "phase_seconds": phases,
        "step_seconds": [r["step_seconds"] for r in rows],
    }


def time_ppo_iterations(
    *,
    model_dir: str | Path,
    reward_model_dir: str | Path,
    prompts: list,
    iterations: int,
    rollouts: int = 16,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    workdir: str | Path,
    trainer_threads: int = 2,
    generation_threads: int = 2,
    reward_threads: int = 2,
    ppo_overrides: dict | None = None,
) -> dict:
    """Run ``iterations`` PPO iterations through freshly started services; see the module docstring.

    Returns {"seconds_per_iteration", "rollouts_per_second", "rollouts_per_step", "phase_seconds",
    "step_seconds", "metrics" (the last iteration's learning metrics), "settings"}.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_file = write_prompts(workdir / "ppo-prompts.jsonl", prompts)
    run_dir = workdir / "ppo-run"
    settings = dict(
        model=str(model_dir),
        data_file=str(data_file),
        eval_fraction=0.0,
        run_dir=str(run_dir),
        batch_size=rollouts,
        micro_batch_size=rollouts,
        response_length=max_new_tokens,
        temperature=temperature,
        max_steps=iterations,
        num_ppo_epochs=1,
        num_mini_batches=1,
        checkpoint_every=0,
        serve=False,
        metrics_port=-1,
        progress=False,
        torch_threads=trainer_threads,
    )
    settings.update(ppo_overrides or {})
    with Launcher(workdir / "services", env=ENV) as launcher:
        generation = launcher.start(
            "generation",
            ["serve", "generation"],
            args=["--model", str(model_dir), "--torch-threads", str(generation_threads)]
            + ["--max-batch-size", str(max(rollouts, 32))],
        )
        reward = launcher.start(
            "reward",
            ["serve", "reward"],
            args=["--model", str(reward_model_dir), "--torch-threads", str(reward_threads)],
        )
        targets = dict(generation_target=generation.target, reward_target=reward.target)
        run_ppo_job(workdir, {**settings, **targets})
    rows = read_metrics(run_dir)
    result = summarize(rows, rollouts)
    result["metrics"] = {k: rows[-1][k] for k in LAST_METRICS if k in rows[-1]}
    result["settings"] = {
        "trainer_threads": trainer_threads,
        "generation_threads": generation_threads,
        "reward_threads": reward_threads,
        **settings,
    }
    return result


def write_prompts(path: Path, prompts: list) -> Path:
    """The PPO job's data file: one ``{"prompt": ...}`` per line."""
    with open(path, "w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return path


def run_ppo_job(workdir: Path, settings: dict) -> None:
    """``rlhf train ppo`` as a process with ``settings`` as its config; raises with the log's tail if it fails."""
    config = workdir / "ppo.yaml"
    config.write_text(yaml.safe_dump({"ppo": settings}))
    log_path = workdir / "trainer.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.run(
            [sys.executable, "-m", "rlhf.cli", "train", "ppo", "--config", str(config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV},
        )
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"rlhf train ppo failed ({proc.returncode}); log {log_path}:\n{tail}")
