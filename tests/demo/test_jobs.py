"""The demo's trainer jobs are configured from its settings: each job config validates and carries them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rlhf.demo.config import PRESETS, DemoConfig, resolve
from rlhf.demo.jobs import base_model_path, ppo_config, reward_model_config, sft_config, threads_env

SERVICES = {
    name: SimpleNamespace(target=f"127.0.0.1:{port}")
    for name, port in [("feedback", 1), ("generation", 2), ("reward", 3)]
}


def test_every_job_trains_on_its_snapshot_in_its_own_folder_and_the_supervised_ones_on_the_cpu(tmp_path):
    settings = PRESETS["tiny"]
    configs = {
        "sft": sft_config(settings, Path("base"), SERVICES, "demo-sft-s0", tmp_path),
        "reward_model": reward_model_config(settings, Path("sft"), SERVICES, "demo-rm-s0", tmp_path),
        "ppo": ppo_config(settings, Path("sft"), SERVICES, "demo-ppo-prompts-s0", tmp_path),
    }
    for job, cfg in configs.items():
        assert cfg.run_dir == str(tmp_path / job)
        assert cfg.feedback_target == "127.0.0.1:1" and cfg.max_length == settings.max_length
        assert cfg.snapshot.startswith("demo-") and cfg.metrics_port == -1
    assert configs["sft"].device == configs["reward_model"].device == "cpu"
    assert not hasattr(configs["ppo"], "device") and not hasattr(configs["ppo"], "eval_every")
    assert configs["sft"].model == "base" and configs["sft"].learning_rate == settings.sft_learning_rate
    rm = configs["reward_model"]
    assert (rm.trainable_layers, rm.head_learning_rate) == (
        settings.trainable_layers,
        settings.head_learning_rate,
    )


def test_ppo_job_gets_the_services_and_the_settings_under_their_own_names(tmp_path):
    settings = resolve(DemoConfig(preset="tiny", kl_coef=0.3, ppo_iterations=5))
    ppo = ppo_config(settings, Path("sft"), SERVICES, "demo-ppo-prompts-s0", tmp_path)
    assert (ppo.generation_target, ppo.reward_target) == ("127.0.0.1:2", "127.0.0.1:3")
    assert (ppo.kl_coef, ppo.max_steps, ppo.batch_size) == (0.3, 5, settings.ppo_rollouts)
    assert ppo.response_length == settings.response_length and ppo.adaptive_kl is False
    adaptive = ppo_config(resolve(DemoConfig(target_kl=4.0)), Path("sft"), SERVICES, "p", tmp_path)
    assert adaptive.adaptive_kl and adaptive.target_kl == 4.0


def test_tiny_base_model_is_built_once_into_the_run_folder(tmp_path):
    folder = base_model_path(PRESETS["tiny"], tmp_path)
    assert folder == tmp_path / "models" / "base" and (folder / "config.json").exists()
    assert base_model_path(PRESETS["tiny"], tmp_path) == folder
    assert threads_env(3)["OMP_NUM_THREADS"] == "3"
