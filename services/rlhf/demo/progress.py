"""What the demo shows while it runs: a ``[3/8] sft ...`` line per stage with the elapsed time and an ETA,
and tqdm bars for the samples of each stage (both on stderr, both off with ``--no-progress``)."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from rlhf.demo.config import STAGES


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class StageClock:
    """Prints ``[3/8] sft ...`` lines with the elapsed time and an ETA: the preset's remaining estimates,
    scaled by how fast the finished stages ran compared with their estimates. The speed starts from a prior
    worth a tenth of the whole estimate at speed 1, so a short first stage (services: a few seconds) does not
    halve or double the ETA on its own."""

    def __init__(self, estimates: dict[str, float], enabled: bool = True, stream=None):
        self.estimates = {s: float(estimates.get(s, 1.0)) for s in STAGES}
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._t0 = 0.0

    def eta(self) -> float:
        prior = 0.1 * sum(self.estimates.values())
        done_est = sum(self.estimates[s] for s in self.seconds) + prior
        done_real = sum(self.seconds.values()) + prior
        speed = done_real / done_est if done_est > 0 else 1.0
        remaining = [s for s in STAGES if s not in self.seconds]
        return speed * sum(self.estimates[s] for s in remaining)

    def begin(self, stage: str, detail: str = "") -> None:
        self._current, self._t0 = stage, time.monotonic()
        if self.enabled:
            index = STAGES.index(stage) + 1
            elapsed = time.monotonic() - self.start
            print(
                f"[{index}/{len(STAGES)}] {stage}{(': ' + detail) if detail else ''}  "
                f"(elapsed {_clock(elapsed)}, ETA {_clock(self.eta())} left)",
                file=self.stream,
                flush=True,
            )

    @property
    def current(self) -> str | None:
        """The stage under way (None between stages)."""
        return self._current

    def end(self) -> float:
        seconds = time.monotonic() - self._t0
        if self._current is not None:
            self.seconds[self._current] = seconds
        self._current = None
        return seconds


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "samples") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
