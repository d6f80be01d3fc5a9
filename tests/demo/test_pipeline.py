"""Pieces of the demo pipeline that need no services: presets, the ETA clock, the target table, the CLI."""

from __future__ import annotations

import io

import pytest

from rlhf.cli import build_parser
from rlhf.demo.cli import DemoConfig
from rlhf.demo.pipeline import PRESETS, STAGES, StageClock, command_line, resolve_preset, targets


def test_every_preset_estimates_every_stage_and_fits_its_budget():
    for preset in PRESETS.values():
        assert set(preset.stage_estimates) == set(STAGES)
    assert sum(PRESETS["default"].stage_estimates.values()) <= 25 * 60
    assert sum(PRESETS["tiny"].stage_estimates.values()) <= 2 * 60
    assert PRESETS["tiny"].model == "tiny" and PRESETS["default"].model == "default"


def test_overrides_replace_preset_sizes():
    cfg = DemoConfig(preset="tiny", ppo_iterations=7, eval_prompts=5, comparison_prompts=9)
    preset = resolve_preset(cfg)
    assert preset.ppo_iterations == 7 and preset.eval_prompts == 5 and preset.comparison_prompts == 9
    assert preset.demo_prompts == PRESETS["tiny"].demo_prompts
    assert command_line(cfg) == (
        "rlhf demo --preset tiny --seed 0 --ppo-iterations 7 --comparison-prompts 9 --eval-prompts 5"
    )
    assert resolve_preset(DemoConfig(preset="tiny")) == PRESETS["tiny"]
    # the ETA follows: PPO's estimate scales with the iterations, the untouched stages keep theirs
    default = PRESETS["default"]
    longer = resolve_preset(DemoConfig(ppo_iterations=2 * default.ppo_iterations))
    assert longer.stage_estimates["ppo"] == pytest.approx(2 * default.stage_estimates["ppo"])
    assert longer.stage_estimates["sft"] == default.stage_estimates["sft"]


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


def _eval(gold_mean, distinct_2, kl=None):
    summary = {"gold_mean": gold_mean, "distinct_2": distinct_2}
    if kl is not None:
        summary["kl_mean"] = kl
    return {"summary": summary}


def test_targets_compare_each_figure_with_the_issue_threshold():
    results = {
        "win_rate": {"rate": 0.85},
        "evals": {"SFT": _eval(0.3, 0.6), "PPO": _eval(0.8, 0.25, kl=12.0)},
        "reward_model": {"eval_accuracy": 0.70, "bayes_optimal_accuracy": 0.72},
    }
    met = {t["name"]: t["met"] for t in targets(results)}
    assert met == {
        "PPO beats SFT (gold, pairwise)": True,
        "KL(PPO || SFT) per response": False,
        "no collapse in distinct-2 (PPO >= 0.5 x SFT)": False,
        "RM held-out accuracy within 3 points of Bayes-optimal": True,
    }


def test_demo_command_is_registered_with_its_flags():
    args = build_parser().parse_args(
        ["demo", "--preset", "tiny", "--run-dir", "x", "--no-progress", "--seed", "3"]
    )
    assert args.preset == "tiny" and args.run_dir == "x" and args.progress is False and args.seed == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--preset", "huge"])
