"""PPO against real generation and reward services (processes started with rlhf.core.launcher).

The reward model here is built by hand so that its preference is known: one transformer layer whose attention
is uniform (zero query/key weights) and whose value/output projections carry one embedding dimension that is
set only for tokens containing the letter "e"; the score head reads that dimension at the last token. Its
score is therefore an increasing function of the share of "e" tokens in the conversation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rlhf.core.launcher import Launcher
from rlhf.trainer.config import PPOConfig
from rlhf.trainer.metrics import read_metrics

PREFERRED_LETTER = "e"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_letter_reward_model(folder: Path, letter: str = PREFERRED_LETTER) -> Path:
    from transformers import LlamaForSequenceClassification

    from rlhf.core.models import build_tiny_tokenizer, tiny_llama_config

    tok = build_tiny_tokenizer()
    special = set(tok.all_special_ids)
    preferred = [i for i in range(len(tok)) if i not in special and letter in tok.decode([i])]
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(tok, num_labels=1, num_hidden_layers=1))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(std=1.0)
        emb[:, 0] = 0.0
        emb[preferred, 0] = 3.0
        layer = model.model.layers[0]
        attn = layer.self_attn
        for weight in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
            weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        attn.v_proj.weight[0, 0] = 1.0  # value head 0, dim 0 <- embedding dim 0 (the "e" flag)
        attn.o_proj.weight[0, 0] = 1.0  # residual dim 0 <- mean of the flags over the sequence
        model.score.weight.zero_()
        model.score.weight[0, 0] = 10.0
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def letter_rm_path(tmp_path_factory):
    return make_letter_reward_model(tmp_path_factory.mktemp("letter-rm"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo-data") / "prompts.jsonl"
    subjects = ["the cat", "a dog", "the sea", "my friend", "the weather", "the food", "a train", "the movie"]
    with open(path, "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"Tell me about {subjects[i % 8]} ({i})."}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_lm_path, letter_rm_path):
    with Launcher(tmp_path_factory.mktemp("services"), env=ENV) as launcher:
        launcher.start(
            "generation",
            ["serve", "generation"],
            args=["--model", str(tiny_lm_path), "--torch-threads", "1"],
        )
        launcher.start(
            "reward", ["serve", "reward"], args=["--model", str(letter_rm_path), "--torch-threads", "1"]
        )
        yield launcher


def ppo_config(services, tiny_lm_path, prompts_file, run_dir, **overrides) -> PPOConfig:
    settings = dict(
        model=str(tiny_lm_path),
        data_file=prompts_file,
        eval_fraction=0.0,
        run_dir=str(run_dir),
        generation_target=services.services["generation"].target,
        reward_target=services.services["reward"].target,
        batch_size=16,
        micro_batch_size=16,
        response_length=12,
        temperature=1.0,
        learning_rate=1e-2,
        value_learning_rate=1e-2,
        kl_coef=0.01,
        missing_eos_penalty=None,
        max_steps=4,
        checkpoint_every=0,
        serve=False,
        metrics_port=-1,
        progress=False,
        torch_threads=1,
        service_retry_seconds=60,
        service_timeout=60,
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def generation_version(services) -> int:
    from rlhf.generation.client import PolicyClient

    client = PolicyClient(services.services["generation"].target)
    try:
        return int(client.model_info().version or 0)
    finally:
        client.close()


def test_ppo_run_raises_the_reward_of_the_preferred_letter_with_kl_reported(
    services, tiny_lm_path, prompts_file, tmp_path
):
    from rlhf.trainer.ppo import run_ppo

    cfg = ppo_config(
        services,
        tiny_lm_path,
        prompts_file,
        tmp_path / "run",
        max_steps=8,
        num_ppo_epochs=2,
        num_mini_batches=2,
        micro_batch_size=4,
    )
    final = run_ppo(cfg)
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    first = sum(r["reward_mean"] for r in rows[:2]) / 2
    last = sum(r["reward_mean"] for r in rows[-2:]) / 2
    assert last > first + 1.0, [round(r["reward_mean"], 2) for r in rows]
    assert rows[-1]["kl"] > 0 and all("kl" in r and "kl_coef" in r for r in rows)
    # every rollout came from the trainer's own weights: the push worked each iteration
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-3
    versions = [r["policy_version"] for r in rows]
    assert versions == sorted(set(versions))
    assert generation_version(services) == versions[-1] + 1  # the final weights were pushed
    for phase in ("generate", "score", "reference", "values", "update", "sync"):
        assert f"time/{phase}" in rows[-1]
    assert (final / "config.json").exists() and (final / "value_head.safetensors").exists()


def test_fused_single_minibatch_update_learns_too(services, tiny_lm_path, prompts_file, tmp_path):
    from rlhf.trainer.ppo import run_ppo

    cfg = ppo_config(services, tiny_lm_path, prompts_file, tmp_path / "run", max_steps=8, seed=1)
    run_ppo(cfg)
    rows = read_metrics(cfg.run_dir)
    assert "time/values" not in rows[-1]  # the values come from the first PPO forward
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first, [round(r["reward_mean"], 2) for r in rows]
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-3


@pytest.mark.parametrize("by_path", [True, False])
def test_a_push_that_loses_a_race_to_another_pusher_goes_out_under_the_next_version(
    services, tiny_lm_path, tmp_path, by_path
):
    """Between the trainer's version read and its UpdateWeights, someone else pushes that same version: the
    service refuses ours (FAILED_PRECONDITION); the trainer renumbers and pushes again instead of failing."""
    from rlhf.core.models import load_causal_lm
    from rlhf.generation.client import PolicyClient
    from rlhf.trainer.weight_sync import PolicySync

    class RacedClient:
        """The real client, except that someone else's push lands first, once."""

        def __init__(self, client):
            self.client, self.raced = client, False

        def __getattr__(self, name):
            return getattr(self.client, name)

        def update_weights(self, *, version, **kwargs):
            if not self.raced:
                self.raced = True
                self.client.update_weights(version=version, checkpoint_path=str(tiny_lm_path))
            return self.client.update_weights(version=version, **kwargs)

    model = load_causal_lm(tiny_lm_path)
    with PolicyClient(services.services["generation"].target, timeout=60) as client:
        raced = RacedClient(client)
        sync = PolicySync(raced, str(tmp_path / "push") if by_path else "", "race")
        try:
            before = generation_version(services)
            served = sync.push(model)
            assert raced.raced
            assert served == sync.version == before + 2  # the other pusher took before + 1
            assert generation_version(services) == served
            assert sync.push(model) == served  # already serving ours: nothing to push
            if by_path:  # only the newest pushed file is kept
                assert [p.name for p in sync.push_dir.iterdir()] == [f"policy-v{served}.safetensors"]
        finally:
            sync.close()


def _restart(launcher: Launcher, name: str) -> None:
    """Stop a service and start it again on the same port (a pod restart behind the same address)."""
    old = launcher.services[name]
    port = old.port
    argv = old.args
    launcher.stop(name)
    model = argv[argv.index("--model") + 1]
    launcher.start(
        name, ["serve", name], args=["--model", model, "--torch-threads", "1", "--port", str(port)]
    )
    assert launcher.services[name].port == port


@pytest.mark.slow
@pytest.mark.parametrize("service", ["reward", "generation"])
def test_a_service_restarted_mid_run_does_not_end_the_run(
    services, tiny_lm_path, prompts_file, tmp_path, service
):
    from rlhf.trainer.ppo import run_ppo

    total = 8
    cfg = ppo_config(services, tiny_lm_path, prompts_file, tmp_path / "run", max_steps=total)
    outcome: dict = {}

    def train():
        try:
            outcome["final"] = run_ppo(cfg)
        except BaseException as exc:  # reported to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    try:
        metrics = Path(cfg.run_dir) / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while len(read_metrics(cfg.run_dir)) < 1 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.exists(), outcome
        _restart(services, service)
        steps_at_restart = len(read_metrics(cfg.run_dir))
    finally:
        thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert steps_at_restart < total  # the run was still going while the service was down
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert (
        max(r["logprob_mismatch_max"] for r in rows) < 1e-3
    )  # a restarted generation service got our weights


def test_a_service_that_stays_down_ends_the_job_after_a_checkpoint(
    services, tiny_lm_path, prompts_file, tmp_path
):
    from rlhf.core.errors import ServiceDown
    from rlhf.trainer.ppo import run_ppo

    cfg = ppo_config(
        services,
        tiny_lm_path,
        prompts_file,
        tmp_path / "run",
        reward_target="127.0.0.1:1",  # nothing listens there
        service_retry_seconds=1.0,
        service_timeout=5,
    )
    with pytest.raises(ServiceDown, match=r"reward service at 127\.0\.0\.1:1.*--resume"):
        run_ppo(cfg)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-0"
    assert (tmp_path / "run" / "checkpoints" / latest / "trainer_state.pt").exists()


@pytest.mark.slow
def test_sigkill_mid_ppo_then_resume_continues_from_the_checkpoint(
    services, tiny_lm_path, prompts_file, tmp_path
):
    run_dir = tmp_path / "run"
    total = 8
    argv = [
        sys.executable,
        "-m",
        "rlhf.cli",
        "train",
        "ppo",
        "--model",
        str(tiny_lm_path),
        "--data-file",
        prompts_file,
        "--eval-fraction",
        "0",
        "--run-dir",
        str(run_dir),
        "--generation-target",
        services.services["generation"].target,
        "--reward-target",
        services.services["reward"].target,
        "--batch-size",
        "16",
        "--micro-batch-size",
        "16",
        "--response-length",
        "12",
        "--temperature",
        "1.0",
        "--learning-rate",
        "1e-2",
        "--max-steps",
        str(total),
        "--checkpoint-every",
        "2",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--torch-threads",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, **ENV}
    log1 = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(argv, stdout=log1, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            rows = read_metrics(run_dir)
            if len(rows) >= 3:  # past the checkpoint at step 2
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log1.close()
    killed_rows = read_metrics(run_dir)
    checkpoint_step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 2 <= checkpoint_step < total
    version_before = generation_version(services)

    resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {checkpoint_step})" in resumed.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert rows[:checkpoint_step] == killed_rows[:checkpoint_step]  # history up to the checkpoint kept
    after = rows[checkpoint_step:]
    # the resumed weights were pushed (with a newer version) before the first resumed rollout
    assert after[0]["policy_version"] == version_before + 1
    assert max(r["logprob_mismatch_max"] for r in after) < 1e-3
