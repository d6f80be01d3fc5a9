"""Shared by the baseline scripts (copied next to them in the venv run): a callback that times optimizer steps."""

import time

from transformers import TrainerCallback


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
