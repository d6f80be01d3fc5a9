"""A real ``rlhf train sft`` process: SIGKILL then --resume continues the same run to the same weights;
TrainerService GetStatus/Stop from another process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from rlhf.core.client import make_channel
from rlhf.trainer.config import SFTConfig
from rlhf.trainer.metrics import read_metrics
from rlhf.trainer.sft import run_sft
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def sft_command(model, data_file, run_dir, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlhf.cli",
        "train",
        "sft",
        "--model",
        str(model),
        "--data-file",
        data_file,
        "--run-dir",
        str(run_dir),
        "--metrics-port",
        "-1",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--learning-rate",
        "3e-3",
        "--eval-every",
        "0",
        "--torch-threads",
        "1",
        "--no-progress",
        *extra,
    ]


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(
                f"process ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}"
            )
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.exists() else 0


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_continues_to_the_uninterrupted_weights(tmp_path, tiny_lm_path, sft_jsonl):
    steps = ["--max-steps", "60", "--checkpoint-every", "5", "--port", "0"]
    reference = run_sft(
        SFTConfig(
            model=str(tiny_lm_path),
            data_file=sft_jsonl,
            run_dir=str(tmp_path / "ref"),
            metrics_port=-1,
            batch_size=8,
            micro_batch_size=4,
            learning_rate=3e-3,
            eval_every=0,
            torch_threads=1,
            progress=False,
            max_steps=60,
            checkpoint_every=0,
            serve=False,
        )
    )

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        sft_command(tiny_lm_path, sft_jsonl, run_dir, *steps), env=ENV, stderr=subprocess.PIPE, text=True
    )
    try:
        killed_after = wait_for(lambda: latest_step(run_dir), proc, "the first checkpoint")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "final").exists()
    at_kill = latest_step(run_dir)
    assert killed_after <= at_kill < 60

    resumed = subprocess.run(
        sft_command(tiny_lm_path, sft_jsonl, run_dir, *steps, "--resume"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {at_kill})" in resumed.stderr  # continued from the checkpoint, not from scratch
    assert [h["step"] for h in read_metrics(run_dir)] == list(range(1, 61))
    a, b = weights(reference), weights(run_dir / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_trainer_service_status_and_stop_from_another_process(tmp_path, tiny_lm_path, sft_jsonl):
    port_file = tmp_path / "ports.json"
    run_dir = tmp_path / "svc"
    proc = subprocess.Popen(
        sft_command(
            tiny_lm_path,
            sft_jsonl,
            run_dir,
            "--max-steps",
            "100000",
            "--checkpoint-every",
            "0",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ),
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = wait_for(
            lambda: port_file.exists() and json.loads(port_file.read_text())["port"], proc, "the port"
        )
        with make_channel(f"127.0.0.1:{port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)

            def running_status():
                try:
                    status = stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).status
                except grpc.RpcError:
                    return None
                return status if status.state == trainer_pb2.JOB_STATE_RUNNING and status.step >= 3 else None

            status = wait_for(running_status, proc, "a RUNNING status")
            assert status.kind == trainer_pb2.JOB_KIND_SFT
            assert status.total_steps == 100000 and status.job_id == "svc"
            assert "loss" in status.metrics and status.snapshot == sft_jsonl
            stopped = stub.Stop(trainer_pb2.StopRequest(reason="test"), timeout=10).status
            assert stopped.state == trainer_pb2.JOB_STATE_STOPPING
        assert proc.wait(timeout=120) == 3  # stopped before the end: resumable, not a success
        assert "resume with --resume" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    stop_step = latest_step(run_dir)
    assert stop_step >= status.step
    assert read_metrics(run_dir)[-1]["step"] == stop_step
    assert not (run_dir / "final").exists()


def test_resume_without_checkpoint_starts_from_step_zero(tmp_path, tiny_lm_path, sft_jsonl):
    cfg = SFTConfig(
        model=str(tiny_lm_path),
        data_file=sft_jsonl,
        run_dir=str(tmp_path / "new"),
        metrics_port=-1,
        serve=False,
        progress=False,
        max_steps=2,
        resume=True,
        torch_threads=1,
    )
    assert run_sft(cfg) == tmp_path / "new" / "final"
    assert [h["step"] for h in read_metrics(tmp_path / "new")] == [1, 2]
