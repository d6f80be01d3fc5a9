"""Benchmark of the supervised jobs on the real model: ``python -m rlhf.bench train``.

Runs ``run_sft`` and ``run_reward_model`` on SmolLM2-135M-Instruct (the built-in default) for a few steps
on synthetic data of a fixed shape (global batch 8, about 96 tokens per sequence, the shape of FACTS.md's
reference measurement), one process, and reports from the jobs' own metrics: seconds per optimizer step,
tokens per second, seconds per checkpoint (model + optimizer + scheduler + RNG) and the time to resume.
The first step (allocation, warm-up) is left out of the step statistics.

Settings: ``RLHF_BENCH_MODEL`` (default: the built-in model), ``RLHF_BENCH_STEPS`` (default 4),
``RLHF_TORCH_THREADS`` (default 2; on a machine shared with other busy processes, 1 thread is often much
faster than 2, as OpenMP threads wait on each other).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rlhf.bench.results import write_result
from rlhf.core.models import resolve_model_path
from rlhf.trainer.config import RewardModelConfig, SFTConfig
from rlhf.trainer.metrics import read_metrics
from rlhf.trainer.reward_model import run_reward_model
from rlhf.trainer.sft import run_sft

SUBJECTS = ["the harbour", "a red bicycle", "my grandmother's kitchen", "the night train", "a mountain lake"]
FILLER = (
    "It was quiet, and the light was soft on every surface; people walked slowly and spoke in low voices."
)


def _data(folder: Path, n: int = 48) -> tuple[str, str]:
    """Demonstrations and preference pairs of about 96 tokens each (prompt + response) with SmolLM2's tokenizer."""
    demos, prefs = folder / "demos.jsonl", folder / "prefs.jsonl"
    with open(demos, "w") as d, open(prefs, "w") as p:
        for i in range(n):
            subject = SUBJECTS[i % len(SUBJECTS)]
            prompt = f"Describe {subject} in two sentences. ({i})"
            response = f"{subject.capitalize()} was there. {FILLER} {FILLER[: 20 + i % 10]}"
            d.write(json.dumps({"prompt": prompt, "completion": response}) + "\n")
            p.write(
                json.dumps({"prompt": prompt, "chosen": response, "rejected": response[::-1][:80]}) + "\n"
            )
    return str(demos), str(prefs)


def _summary(run_dir: Path, total_seconds: float) -> dict:
    rows = read_metrics(run_dir)
    steady = rows[1:] or rows
    step_s = [r["step_seconds"] for r in steady]
    out = {
        "steps": len(rows),
        "step_seconds_median": round(statistics.median(step_s), 3),
        "step_seconds_min": round(min(step_s), 3),
        "tokens_per_second_median": round(
            statistics.median(r.get("tokens_per_second", 0.0) for r in steady), 1
        ),
        "checkpoint_seconds": [round(r["time/checkpoint"], 3) for r in rows if "time/checkpoint" in r],
        "wall_seconds": round(total_seconds, 1),
    }
    return out


def run(out_dir: Path) -> dict:
    model = str(resolve_model_path(os.environ.get("RLHF_BENCH_MODEL") or None))
    steps = int(os.environ.get("RLHF_BENCH_STEPS", "4"))
    threads = int(os.environ.get("RLHF_TORCH_THREADS", "2"))
    work = Path(tempfile.mkdtemp(prefix="rlhf-train-bench-"))
    try:
        demos, prefs = _data(work)
        common = dict(
            model=model,
            serve=False,
            metrics_port=-1,
            progress=False,
            max_steps=steps,
            batch_size=8,
            micro_batch_size=8,
            eval_every=0,
            checkpoint_every=max(1, steps // 2),
            eval_fraction=0.0,
            torch_threads=threads,
            max_length=128,
            log_level="WARNING",
        )
        results: dict = {
            "model": model,
            "torch_threads": threads,
            "batch_size": 8,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # a shared machine shows here
        }

        start = time.perf_counter()
        run_sft(SFTConfig(data_file=demos, run_dir=str(work / "sft"), **common))
        results["sft"] = _summary(work / "sft", time.perf_counter() - start)

        # resume cost: load the latest checkpoint (model, optimizer, scheduler, RNG) and run one more step
        start = time.perf_counter()
        resumed = {**common, "max_steps": steps + 1}
        run_sft(SFTConfig(data_file=demos, run_dir=str(work / "sft"), resume=True, **resumed))
        results["sft"]["resume_and_one_step_seconds"] = round(time.perf_counter() - start, 1)

        start = time.perf_counter()
        run_reward_model(RewardModelConfig(data_file=prefs, run_dir=str(work / "rm"), **common))
        results["reward_model"] = _summary(work / "rm", time.perf_counter() - start)
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sft, rm = results["sft"], results["reward_model"]
    markdown = "\n".join(
        [
            f"# Trainer jobs on {Path(model).name} (batch 8 x ~96 tokens, {threads} torch threads, one process)",
            "",
            "| job | s/step (median) | tokens/s (median) | checkpoint s | wall s |",
            "| --- | --- | --- | --- | --- |",
            f"| SFT | {sft['step_seconds_median']} | {sft['tokens_per_second_median']} | "
            f"{sft['checkpoint_seconds']} | {sft['wall_seconds']} |",
            f"| reward model (pairs: 2 x 8 sequences) | {rm['step_seconds_median']} | "
            f"{rm['tokens_per_second_median']} | {rm['checkpoint_seconds']} | {rm['wall_seconds']} |",
            "",
            f"SFT resume from the latest checkpoint plus one step: {sft['resume_and_one_step_seconds']} s.",
            f"Load average (1, 5, 15 min) at start {results['load_average_at_start']}, at end "
            f"{results['load_average_at_end']}: on a shared machine the times above include the contention.",
            "",
        ]
    )
    write_result(out_dir, "train", results, markdown)
    return results
