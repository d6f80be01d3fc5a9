"""The job shell: metrics history, atomic checkpoints with a latest pointer, exact resume, and the
TrainerService answering while the loop runs."""

from __future__ import annotations

import contextlib
import json
import threading

import grpc
import pytest
import torch

from rlhf.core.client import make_channel
from rlhf.trainer.config import SFTConfig
from rlhf.trainer.job import JobStopped, TrainJob
from rlhf.trainer.metrics import read_metrics
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc


def _cfg(run_dir, **kw) -> SFTConfig:
    base = dict(
        run_dir=str(run_dir), port=0, metrics_port=-1, checkpoint_every=3, eval_every=2, progress=False
    )
    base.update(kw)
    return SFTConfig(**base)


def _toy_run(cfg: SFTConfig, total: int, stop_after=None, on_step=None, signals=False, raise_stopped=False):
    """A toy regression loop in the job shell; returns (weights, job)."""
    job = TrainJob(
        cfg, kind="sft", total_steps=total, eval_every=cfg.eval_every, install_signal_handlers=signals
    )
    with contextlib.nullcontext() if raise_stopped else contextlib.suppress(JobStopped), job:
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (total + 1))
        job.track("head", model)
        job.track("optimizer", opt)
        job.track("scheduler", sched)
        state = job.resume()
        seen = state.get("seen", 0)
        while not job.done:
            x = torch.randn(8, 4)  # from the restored RNG: same data after a resume
            loss = ((model(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += 8
            job.end_step(
                {"loss": loss.item()}, train_state={"seen": seen}, evaluate=lambda: {"eval_loss": 1.0}
            )
            if on_step:
                on_step(job)
            if stop_after is not None and job.step == stop_after:
                job.request_stop("test")
        job.finish()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), job


def test_history_checkpoints_and_latest_pointer(tmp_path):
    weights, job = _toy_run(_cfg(tmp_path / "run"), total=7)
    history = read_metrics(tmp_path / "run")
    assert [h["step"] for h in history] == list(range(1, 8))
    assert all("loss" in h for h in history)
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4, 6, 7]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-6"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-3", "step-6"]
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # no leftover temp folders
    assert job.status().state == trainer_pb2.JOB_STATE_SUCCEEDED


def test_stop_then_resume_gives_the_uninterrupted_result(tmp_path):
    reference, _ = _toy_run(_cfg(tmp_path / "a", checkpoint_every=0), total=9)
    _, stopped = _toy_run(_cfg(tmp_path / "b", checkpoint_every=0), total=9, stop_after=4)
    assert stopped.status().state == trainer_pb2.JOB_STATE_STOPPED
    # the stop asked for after step 4 takes effect at the next step boundary
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-5"
    resumed, job = _toy_run(_cfg(tmp_path / "b", checkpoint_every=0, resume=True), total=9)
    assert job.status().state == trainer_pb2.JOB_STATE_SUCCEEDED
    torch.testing.assert_close(resumed, reference, rtol=0, atol=0)
    steps = [h["step"] for h in read_metrics(tmp_path / "b")]
    assert steps == list(range(1, 10))


def test_resume_drops_history_after_the_checkpoint(tmp_path):
    cfg = _cfg(tmp_path / "r", checkpoint_every=2)
    _toy_run(cfg, total=5)  # checkpoint at step 4; history up to 5
    resumed_cfg = _cfg(tmp_path / "r", checkpoint_every=2, resume=True)
    lines = []
    _toy_run(resumed_cfg, total=6, on_step=lambda job: lines.append(job.step))
    assert lines == [5, 6]  # continued from step 4
    steps = [h["step"] for h in read_metrics(tmp_path / "r")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_trainer_service_status_checkpoint_and_stop(tmp_path):
    port_file = tmp_path / "ports.json"
    cfg = _cfg(tmp_path / "svc", checkpoint_every=0, port_file=str(port_file))
    seen = {}
    go = threading.Event()

    def client():
        port = json.loads(port_file.read_text())["port"]
        with make_channel(f"127.0.0.1:{port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            seen["status"] = stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=30).status
            seen["ckpt"] = stub.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(), timeout=60).checkpoint
            seen["stop"] = stub.Stop(trainer_pb2.StopRequest(reason="test"), timeout=30).status
            stream = stub.StreamProgress(trainer_pb2.StreamProgressRequest(), timeout=60)
            seen["stream"] = [r.status.state for r in stream]

    def on_step(job):
        if job.step == 2:
            thread = threading.Thread(target=client)
            thread.start()
            seen["thread"] = thread
            go.set()

    _, job = _toy_run(cfg, total=100000, on_step=on_step)
    seen["thread"].join(timeout=60)
    assert seen["status"].kind == trainer_pb2.JOB_KIND_SFT
    assert seen["status"].total_steps == 100000
    assert seen["status"].job_id == "svc"
    assert (
        seen["ckpt"].step >= 2 and (tmp_path / "svc" / "checkpoints" / f"step-{seen['ckpt'].step}").is_dir()
    )
    assert seen["stop"].state == trainer_pb2.JOB_STATE_STOPPING
    assert seen["stream"][-1] == trainer_pb2.JOB_STATE_STOPPED
    assert job.status().state == trainer_pb2.JOB_STATE_STOPPED
    assert job.step < 100000


def test_save_checkpoint_after_the_end_is_refused(tmp_path):
    _, job = _toy_run(_cfg(tmp_path / "end"), total=2)
    with pytest.raises(Exception) as info:
        job.request_checkpoint().result(timeout=5)
    assert "ended" in str(info.value)
    assert grpc.StatusCode.FAILED_PRECONDITION == info.value.code


def test_prometheus_metrics_follow_the_contract(tmp_path):
    import urllib.request

    pages = []

    def scrape(job):
        if job.step == 3:
            with job.phase("generate"):
                pass
            url = f"http://127.0.0.1:{job.metrics_port}/metrics"
            pages.append(urllib.request.urlopen(url, timeout=10).read().decode())

    _toy_run(_cfg(tmp_path / "m", metrics_port=0), total=4, on_step=scrape)
    page = pages[0]
    assert 'rlhf_trainer_step{job="sft"} 3.0' in page
    assert 'rlhf_trainer_loss{job="sft",split="train"}' in page
    assert 'rlhf_trainer_loss{job="sft",split="eval"} 1.0' in page
    assert 'rlhf_trainer_phase_seconds{job="sft",phase="generate"}' in page
    assert 'rlhf_server_ready{service="rlhf.v1.TrainerService"} 1.0' in page


KIND_METRICS_SCRIPT = """
import sys, urllib.request
import torch
from rlhf.trainer.config import SFTConfig
from rlhf.trainer.job import TrainJob

torch.set_num_threads(1)
run_dir = sys.argv[1]
for kind in ("sft", "reward_model", "ppo"):  # in one process: no job sees the series of an earlier one
    cfg = SFTConfig(run_dir=f"{run_dir}/{kind}", port=0, metrics_port=0, checkpoint_every=0, progress=False)
    with TrainJob(cfg, kind=kind, total_steps=2) as job:
        while not job.done:
            # every kind logs the same keys; only its own gauges may be exported
            job.end_step({"loss": 1.0, "kl": 0.25, "kl_coef": 0.05, "eval_accuracy": 0.75})
        page = urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/metrics", timeout=10).read()
        job.finish()
    lines = [line for line in page.decode().splitlines() if line.startswith(("rlhf_ppo_", "rlhf_rm_"))]
    print(kind, sorted(lines), flush=True)
"""


def test_job_kind_gauges_are_exported_only_by_jobs_that_set_them(tmp_path):
    """An SFT job exports no rlhf_ppo_* / rlhf_rm_* series (not even 0); RM and PPO jobs export their own."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", KIND_METRICS_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    pages = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert pages["sft"] == "[]"
    assert pages["reward_model"] == str(["rlhf_rm_eval_accuracy 0.75"])
    assert pages["ppo"] == str(["rlhf_ppo_kl 0.25", "rlhf_ppo_kl_coef 0.05"])
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)

    def term(job):
        if job.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    _, job = _toy_run(_cfg(tmp_path / "t", checkpoint_every=0), total=1000, on_step=term, signals=True)
    assert job.status().state == trainer_pb2.JOB_STATE_STOPPED
    assert job.step == 3 and "SIGTERM" in job.status().message
    with pytest.raises(JobStopped) as info:
        _toy_run(_cfg(tmp_path / "t2", checkpoint_every=0), total=1000, stop_after=1, raise_stopped=True)
    assert info.value.exit_code == 3 and info.value.step == 2
    assert info.value.checkpoint == tmp_path / "t2" / "checkpoints" / "step-2"
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text().strip() == "step-3"
    assert signal.getsignal(signal.SIGTERM) is before  # the job's handler is gone after the job


def test_a_fresh_run_does_not_start_over_an_earlier_runs_checkpoints(tmp_path):
    from rlhf.core.errors import FailedPrecondition

    _toy_run(_cfg(tmp_path / "x", checkpoint_every=2), total=2)
    with pytest.raises(FailedPrecondition, match="--resume"):
        _toy_run(_cfg(tmp_path / "x", checkpoint_every=2), total=2)
    assert [h["step"] for h in read_metrics(tmp_path / "x")] == [1, 2]  # the earlier history is untouched


def test_a_signal_after_the_last_step_still_reaches_the_process(tmp_path):
    """SIGINT during the last step: nothing is left to stop at, so the job completes (final state SUCCEEDED),
    then the signal goes to the handlers the job had replaced (here Python's: KeyboardInterrupt), so an
    embedding program such as `rlhf demo` stops instead of carrying on."""
    import os
    import signal

    def interrupt(job):
        if job.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    # as in a terminal (a test run in the background of a non-interactive shell starts with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _toy_run(_cfg(tmp_path / "t", checkpoint_every=0), total=3, on_step=interrupt, signals=True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "t" / "metrics.jsonl").read_text().count("\n") == 3
