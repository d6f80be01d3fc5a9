import argparse

import pytest
from pydantic import Field, ValidationError

from rlhf.core.config import ServerConfig, add_config_arguments, config_from_args, load_config


class DemoConfig(ServerConfig):
    section = "demo_svc"
    max_batch_size: int = Field(8, ge=1, description="Largest batch.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")


def test_precedence_defaults_yaml_env_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("port: 7000\nmax_batch_size: 4\nlog_level: DEBUG\n")
    env = {"RLHF_PORT": "7100", "RLHF_DEMO_SVC_PORT": "7200", "RLHF_STOP": '["a", "b"]'}
    cfg = load_config(DemoConfig, path, {"max_batch_size": 16}, environ=env)
    assert cfg.port == 7200  # section-specific env beats generic env beats YAML
    assert cfg.max_batch_size == 16  # flags beat everything
    assert cfg.log_level == "DEBUG"  # from YAML
    assert cfg.stop == ["a", "b"]
    assert cfg.grace_seconds == 30.0  # default


def test_yaml_may_hold_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("demo_svc:\n  port: 7300\nother:\n  port: 1\n")
    assert load_config(DemoConfig, path, environ={}).port == 7300


def test_unknown_and_out_of_range_keys_fail_loudly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prot: 7000\n")
    with pytest.raises(ValidationError, match="prot"):
        load_config(DemoConfig, path, environ={})
    with pytest.raises(ValidationError, match="max_batch_size"):
        load_config(DemoConfig, None, {"max_batch_size": 0}, environ={})


def test_flags_are_generated_from_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DemoConfig)
    args = parser.parse_args(["--max-batch-size", "3", "--stop", "x", "y", "--log-format", "json"])
    cfg = config_from_args(DemoConfig, args)
    assert (cfg.max_batch_size, cfg.stop, cfg.log_format) == (3, ["x", "y"], "json")
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])
    assert "Largest batch." in parser.format_help()


def test_default_metrics_ports_are_distinct_clear_of_prometheus_and_scraped_by_the_local_config():
    from pathlib import Path

    import yaml

    from rlhf.feedback.config import FeedbackConfig
    from rlhf.generation.config import GenerationConfig
    from rlhf.reward.config import RewardConfig
    from rlhf.trainer.config import TrainJobConfig

    services = {
        "generation": GenerationConfig,
        "reward": RewardConfig,
        "feedback": FeedbackConfig,
        "trainer": TrainJobConfig,
    }
    defaults = {name: cls.model_fields["metrics_port"].default for name, cls in services.items()}
    defaults["bare ServerConfig"] = ServerConfig.model_fields["metrics_port"].default
    assert len(set(defaults.values())) == len(defaults), defaults
    assert 9090 not in defaults.values(), "9090 is Prometheus' own port"

    local = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "prometheus.yml").read_text())
    scraped = {
        job["job_name"].removeprefix("rlhf-"): [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in local["scrape_configs"]
    }
    assert scraped == {name: [f"127.0.0.1:{defaults[name]}"] for name in services}
