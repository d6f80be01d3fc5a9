import pytest

from rlhf.bench.ppo_iteration import summarize


def test_bench_summary_leaves_out_the_warm_up_and_counts_the_rest_as_idle():
    rows = [
        {"step": 1, "step_seconds": 50.0, "time/generate": 40.0},
        {"step": 2, "step_seconds": 10.0, "time/generate": 4.0, "time/update": 5.0, "time/sync": 0.5},
        {"step": 3, "step_seconds": 12.0, "time/generate": 6.0, "time/update": 5.0, "time/sync": 0.5},
    ]
    result = summarize(rows, rollouts=16)
    assert result["seconds_per_iteration"] == 11.0
    assert result["rollouts_per_second"] == pytest.approx(16 / 11.0)
    assert result["phase_seconds"]["generate"] == 5.0 and result["phase_seconds"]["values"] == 0.0
    assert result["phase_seconds"]["idle"] == pytest.approx(0.5)
    assert result["step_seconds"] == [50.0, 10.0, 12.0]
