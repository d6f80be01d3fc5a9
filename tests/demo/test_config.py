"""The demo's one config type: presets as copies of the default naming what differs, explicit values winning
over the preset, the reproducing command line and the ``rlhf demo`` flags."""

from __future__ import annotations

import pytest

from rlhf.cli import build_parser
from rlhf.core.config import config_from_args
from rlhf.demo.config import DEFAULT, PRESETS, STAGES, DemoConfig, command_line, resolve


def test_every_preset_estimates_every_stage_and_fits_its_budget():
    for preset in PRESETS.values():
        assert set(preset.stage_estimates) == set(STAGES)
    assert sum(PRESETS["default"].stage_estimates.values()) <= 25 * 60
    assert sum(PRESETS["tiny"].stage_estimates.values()) <= 2 * 60
    assert PRESETS["tiny"].model == "tiny" and PRESETS["default"].model == "default"


def test_every_preset_is_a_valid_config_named_after_itself():
    for name, preset in PRESETS.items():
        assert DemoConfig.model_validate(preset.model_dump()) == preset
        assert preset.preset == name
    assert PRESETS["default"] == DEFAULT == DemoConfig()


def test_overrides_replace_preset_sizes():
    cfg = DemoConfig(preset="tiny", ppo_iterations=7, eval_prompts=5, comparison_prompts=9)
    settings = resolve(cfg)
    assert settings.ppo_iterations == 7 and settings.eval_prompts == 5 and settings.comparison_prompts == 9
    assert settings.demo_prompts == PRESETS["tiny"].demo_prompts
    assert command_line(settings) == (
        "rlhf demo --preset tiny --seed 0 --comparison-prompts 9 --ppo-iterations 7 --eval-prompts 5"
    )
    assert resolve(DemoConfig(preset="tiny")) == PRESETS["tiny"]
    # the ETA follows: PPO's estimate scales with the iterations, the untouched stages keep theirs
    default = PRESETS["default"]
    longer = resolve(DemoConfig(ppo_iterations=2 * default.ppo_iterations))
    assert longer.stage_estimates["ppo"] == pytest.approx(2 * default.stage_estimates["ppo"])
    assert longer.stage_estimates["sft"] == default.stage_estimates["sft"]


def test_a_value_set_explicitly_wins_even_when_it_equals_the_default_preset():
    cfg = DemoConfig(preset="tiny", ppo_iterations=DEFAULT.ppo_iterations, trainable_layers=0)
    settings = resolve(cfg)
    assert settings.ppo_iterations == DEFAULT.ppo_iterations != PRESETS["tiny"].ppo_iterations
    assert settings.trainable_layers == 0 and settings.response_length == PRESETS["tiny"].response_length
    assert "--trainable-layers 0" in command_line(settings)


def test_command_line_writes_booleans_as_their_flags_and_reads_back_the_same_settings():
    settings = resolve(DemoConfig(preset="quick", base_comparisons=False, kl_coef=0.2, seed=4))
    line = command_line(settings)
    assert "--no-base-comparisons" in line and "--kl-coef 0.2" in line
    args = build_parser().parse_args(line.split()[1:])
    assert resolve(config_from_args(DemoConfig, args)) == settings


def test_demo_command_is_registered_with_its_flags():
    args = build_parser().parse_args(
        ["demo", "--preset", "tiny", "--run-dir", "x", "--no-progress", "--seed", "3"]
    )
    assert args.preset == "tiny" and args.run_dir == "x" and args.progress is False and args.seed == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--preset", "huge"])


def test_demo_flags_of_the_readme_set_the_run():
    line = "demo --run-dir runs/mine --seed 1 --ppo-iterations 30 --torch-threads 1 --eval-samples 3"
    args = build_parser().parse_args([*line.split(), "--trainable-layers", "1", "--model", "some/folder"])
    settings = resolve(config_from_args(DemoConfig, args))
    assert (settings.run_dir, settings.seed, settings.ppo_iterations) == ("runs/mine", 1, 30)
    assert (settings.torch_threads, settings.eval_samples, settings.trainable_layers) == (1, 3, 1)
    assert settings.model == "some/folder" and settings.demo_prompts == DEFAULT.demo_prompts
