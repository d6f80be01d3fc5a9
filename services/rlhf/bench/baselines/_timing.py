"""Shared by the baseline scripts (imported from beside them in the venv run): their common arguments and a
callback that times optimizer steps."""

import argparse
import json
import time
from pathlib import Path

import trl
from transformers import TrainerCallback


def baseline_parser() -> argparse.ArgumentParser:
    """The arguments every baseline takes: MODEL_DIR RM_DIR PROMPTS_JSON OUT_JSON and the sampling settings."""
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("rm_dir")
    p.add_argument("prompts_json")
    p.add_argument("out_json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    return p


class StepTimer(TrainerCallback):
    """Wall-clock seconds between consecutive step ends (the first one measured from train begin)."""

    def __init__(self):
        self.last = None
        self.step_seconds = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now


def train_and_report(trainer, timer: StepTimer, out_json: str, rollouts_per_step: int, threads: int) -> None:
    """Run ``trainer.train()`` and write its step times (from ``timer``, one of its callbacks) to ``out_json``."""
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    result = {
        "trainer": type(trainer).__name__,
        "trl_version": trl.__version__,
        "step_seconds": timer.step_seconds,
        "total_seconds": total,
        "rollouts_per_step": rollouts_per_step,
        "torch_threads": threads,
    }
    Path(out_json).write_text(json.dumps(result))
