"""The per-stage lines and ETA the demo prints while it runs."""

from __future__ import annotations

import io

import pytest

from rlhf.demo.config import STAGES
from rlhf.demo.progress import StageClock


def test_eta_scales_remaining_estimates_by_observed_speed():
    clock = StageClock({s: 10.0 for s in STAGES}, stream=io.StringIO())
    assert clock.eta() == pytest.approx(10.0 * len(STAGES))
    prior = 0.1 * 10.0 * len(STAGES)
    clock.seconds["services"] = 20.0  # twice slower than estimated: one short stage moves the ETA part way
    assert clock.eta() == pytest.approx((20.0 + prior) / (10.0 + prior) * 10.0 * (len(STAGES) - 1))
    for stage in STAGES[1:-1]:  # every stage but the last twice slower: the ETA nears twice its estimate
        clock.seconds[stage] = 20.0
    assert 1.8 * 10.0 < clock.eta() < 2 * 10.0
    clock.begin("demonstrations", "k samples")
    assert "[2/8] demonstrations: k samples" in clock.stream.getvalue()
    assert clock.end() >= 0 and "demonstrations" in clock.seconds
