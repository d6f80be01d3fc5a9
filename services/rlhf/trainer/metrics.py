"""The trainer jobs' metrics: Prometheus gauges (names fixed in the metrics contract) and metrics.jsonl.

Metric keys with a Prometheus gauge: ``loss`` / ``eval_loss`` (rlhf_trainer_loss{split}), ``eval_accuracy``
(rlhf_rm_eval_accuracy), ``reward_mean``, ``reward_std``, ``kl``, ``entropy``, ``policy_loss``,
``value_loss``, ``clipfrac``, ``approx_kl``, ``response_length``, ``kl_coef`` (rlhf_ppo_*); the RM and PPO
gauges are set (and exported at all) only by jobs of that kind, from the first time they are. Every key lands
in metrics.jsonl and in JobStatus.metrics. ``tokens`` (per step, all ranks) gives ``tokens_per_second``.

Job-kind gauges are registered on first use, so a process exports only the series its job sets: an SFT job
has no rlhf_ppo_* series (an unlabelled Gauge would otherwise be exported as 0 from the moment it exists).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import REGISTRY, Gauge
from tqdm.auto import tqdm

from rlhf.core.files import atomic_write_text

TRAINER_STEP = Gauge("rlhf_trainer_step", "Optimizer steps (PPO: iterations) done.", ["job"])
TRAINER_LOSS = Gauge("rlhf_trainer_loss", "Latest loss, by split (train, eval).", ["job", "split"])
TOKENS_PER_SECOND = Gauge(
    "rlhf_trainer_tokens_per_second", "Tokens trained on per second (last step).", ["job"]
)
PHASE_SECONDS = Gauge(
    "rlhf_trainer_phase_seconds",
    "Seconds the last occurrence of each phase took (generate|score|reference|values|update|sync|idle...).",
    ["job", "phase"],
)
RM_EVAL_ACCURACY_HELP = "Reward model accuracy on held-out comparisons."
PPO_GAUGE_HELP = {
    "reward_mean": "Mean reward-service score of the last rollout.",
    "reward_std": "Standard deviation of the reward-service scores of the last rollout.",
    "kl": "Mean per-sequence KL(policy || reference) of the last rollout.",
    "entropy": "Mean per-token policy entropy of the last rollout.",
    "policy_loss": "PPO clipped policy loss (last iteration mean).",
    "value_loss": "PPO clipped value loss (last iteration mean).",
    "clipfrac": "Fraction of policy ratios clipped (last iteration).",
    "approx_kl": "Approximate KL between the rollout policy and the updated policy.",
    "response_length": "Mean response length in tokens of the last rollout.",
    "kl_coef": "Current KL penalty coefficient.",
}
_KIND_GAUGES: dict[str, Gauge] = {}
_KIND_GAUGES_LOCK = threading.Lock()


def kind_gauge(name: str, help_text: str) -> Gauge:
    """The process-wide gauge ``name``, created (and so exported) the first time a job sets it."""
    with _KIND_GAUGES_LOCK:
        if name not in _KIND_GAUGES:
            _KIND_GAUGES[name] = Gauge(name, help_text)
        return _KIND_GAUGES[name]


def forget_kind_gauges() -> None:
    """Unregister the job-kind gauges set so far: the next job starts exporting none."""
    with _KIND_GAUGES_LOCK:
        for gauge in _KIND_GAUGES.values():
            REGISTRY.unregister(gauge)
        _KIND_GAUGES.clear()


def export_gauges(kind: str, metrics: dict[str, float]) -> None:
    """Set the Prometheus gauges of the keys that have one (see rlhf.trainer.job for the list)."""
    for key, value in metrics.items():
        if key == "loss":
            TRAINER_LOSS.labels(kind, "train").set(value)
        elif key == "eval_loss":
            TRAINER_LOSS.labels(kind, "eval").set(value)
        elif key == "tokens_per_second":
            TOKENS_PER_SECOND.labels(kind).set(value)
        elif key == "eval_accuracy" and kind == "reward_model":
            kind_gauge("rlhf_rm_eval_accuracy", RM_EVAL_ACCURACY_HELP).set(value)
        elif key in PPO_GAUGE_HELP and kind == "ppo":
            kind_gauge(f"rlhf_ppo_{key}", PPO_GAUGE_HELP[key]).set(value)


def to_float(value: Any) -> float | None:
    """A metric value as a float (a tensor's mean); None for what is not a number."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, bool | int | float | np.floating | np.integer):
        return float(value)
    return None


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are numbers, as floats."""
    values = {}
    for key, value in metrics.items():
        number = to_float(value)
        if number is not None:
            values[key] = number
    return values


def progress_bar(total: int, initial: int, desc: str, enabled: bool | None) -> tqdm:
    """The job's progress bar (``enabled`` None: only when stderr is a terminal)."""
    disable = None if enabled is None else not enabled
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=disable)


def show_progress(bar: tqdm, step: int, metrics: dict[str, float]) -> None:
    """Move the bar to ``step`` with the step's metrics (not the timings) beside it."""
    shown = {k: f"{v:.4g}" for k, v in metrics.items() if "/" not in k and k != "step_seconds"}
    bar.set_postfix(shown, refresh=False)
    bar.n = step
    bar.refresh()


def truncate_history(path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl after ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep), fsync=True)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The metrics history of a run (``run_dir/metrics.jsonl``), oldest first."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
