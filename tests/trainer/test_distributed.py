"""``torchrun --nproc_per_node 2`` SFT (DDP, gloo on CPU) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf.trainer.config import SFTConfig
from rlhf.trainer.sft import run_sft


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, tiny_lm_path, sft_jsonl):
    common = dict(max_steps=4, batch_size=8, learning_rate=3e-3, eval_every=4, checkpoint_every=0)
    single = run_sft(
        SFTConfig(
            model=str(tiny_lm_path),
            data_file=sft_jsonl,
            run_dir=str(tmp_path / "single"),
            micro_batch_size=8,
            serve=False,
            metrics_port=-1,
            progress=False,
            torch_threads=1,
            **common,
        )
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "rlhf.cli",
            "train",
            "sft",
            "--model",
            str(tiny_lm_path),
            "--data-file",
            sft_jsonl,
            "--run-dir",
            str(tmp_path / "ddp"),
            "--micro-batch-size",
            "2",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--torch-threads",
            "1",
            "--no-progress",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    a, b = (
        load_file(str(single / "model.safetensors")),
        load_file(str(tmp_path / "ddp" / "final" / "model.safetensors")),
    )
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
    assert any(not torch.equal(a[n], load_file(str(tiny_lm_path / "model.safetensors"))[n]) for n in a)
    history = [
        [json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        for run_dir in ("single", "ddp")
    ]
    assert len(history[0]) == len(history[1]) == 4  # only rank 0 writes the history
    for one, two in zip(*history, strict=True):
        assert abs(one["loss"] - two["loss"]) < 1e-4
    assert abs(history[0][-1]["eval_loss"] - history[1][-1]["eval_loss"]) < 1e-4


@pytest.mark.slow
def test_torchrun_reward_model_matches_one_process(tmp_path, tiny_lm_path, preference_jsonl):
    common = [
        "--max-steps=4",
        "--batch-size=8",
        "--learning-rate=1e-3",
        "--eval-every=4",
        "--checkpoint-every=0",
    ]
    base = [
        "-m",
        "rlhf.cli",
        "train",
        "reward-model",
        "--model",
        str(tiny_lm_path),
        "--data-file",
        preference_jsonl,
        "--eval-fraction",
        "0.25",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--torch-threads",
        "1",
        "--no-progress",
        *common,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {
        "single": [sys.executable, *base, "--run-dir", str(tmp_path / "single")],
        "ddp": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *base,
            "--micro-batch-size",
            "2",
            "--run-dir",
            str(tmp_path / "ddp"),
        ],
    }
    for name, argv in runs.items():
        run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (name, run.stderr[-4000:])
    metas = [json.loads((tmp_path / name / "final" / "rlhf_reward.json").read_text()) for name in runs]
    assert abs(metas[0]["reward_mean"] - metas[1]["reward_mean"]) < 1e-3
    assert abs(metas[0]["reward_std"] - metas[1]["reward_std"]) < 1e-3
    assert metas[0]["eval_accuracy"] == metas[1]["eval_accuracy"]
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
