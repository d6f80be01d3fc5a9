"""The job shell every trainer job (SFT, reward model, PPO) runs inside.

A :class:`TrainJob` gives a training loop, with a few calls:

* a ``rlhf.v1.TrainerService`` gRPC server (GetStatus, StreamProgress, SaveCheckpoint, Stop) on
  ``cfg.port`` with health, reflection, auth and ``/metrics`` from :mod:`rlhf.core.server`, run in a
  background thread (rank 0 only);
* Prometheus metrics (``rlhf_trainer_*``, ``rlhf_ppo_*``, ``rlhf_rm_eval_accuracy``), a tqdm progress bar and
  the metrics history in ``run_dir/metrics.jsonl`` (one JSON object per step: ``{"step": 3, "loss": ...}``);
* checkpoints of everything tracked (models, optimizer, scheduler, any ``state_dict`` object), the RNG
  states of every rank and the loop's own position (``train_state``), written atomically to
  ``run_dir/checkpoints/step-N`` with ``run_dir/checkpoints/latest`` naming the newest; ``cfg.resume``
  continues the same run from there (metrics.jsonl lines after the checkpoint's step are dropped);
* SIGTERM / SIGINT / the Stop RPC: checkpoint at the next step boundary, then stop (a second SIGINT aborts).

Usage (the whole contract)::

    with TrainJob(cfg, kind="sft", total_steps=n_steps) as job:  # seeds Python/NumPy/torch with cfg.seed
        job.track("model", model, tokenizer=tokenizer)  # HF model: save_pretrained into step-N/model
        job.track("optimizer", optimizer)                # anything with state_dict()/load_state_dict()
        job.track("scheduler", scheduler)
        train_state = job.resume()                        # {} on a fresh run, else restores all tracked
                                                          # objects + RNG and returns the saved train_state
        while not job.done:                               # job.step < total_steps and no stop requested
            with job.phase("update"):                     # rlhf_trainer_phase_seconds{phase="update"}
                loss = ...
            job.end_step({"loss": loss}, train_state={"epoch": e, "batch": b}, tokens=n_tokens,
                         evaluate=lambda: {"eval_loss": ...})
        if job.completed:                                 # all steps done (not stopped on request)
            model.save_pretrained(job.run_dir / "final")
        job.finish(job.run_dir / "final")                 # SUCCEEDED; or STOPPED: raises JobStopped

``finish`` raises :class:`JobStopped` when the job stopped before its last step (its checkpoint is
written; ``--resume`` continues it). ``end_step`` increments ``job.step``, calls ``evaluate()`` when due (every ``cfg.eval_every`` steps and at
the last step), logs, and checkpoints when due (every ``cfg.checkpoint_every`` steps), when a
SaveCheckpoint RPC asked for one, or when a stop was requested (then ``job.done`` becomes true).
``train_state`` must be torch-saveable (ints, floats, lists, dicts, tensors); put the data position there
(e.g. epoch and batch index) and, for PPO, anything the loop needs to continue (KL controller value, policy
version: the key ``policy_version`` is also reported in the Checkpoint message). Call ``job.save_checkpoint()``
yourself e.g. before ending the job on an unrecoverable service error, when the tracked state is consistent.
An exception leaving the ``with`` block marks the job FAILED (message = the error) and re-raises.

Metric keys with a Prometheus gauge: ``loss`` / ``eval_loss`` (rlhf_trainer_loss{split}), ``eval_accuracy``
(rlhf_rm_eval_accuracy), ``reward_mean``, ``reward_std``, ``kl``, ``entropy``, ``policy_loss``,
``value_loss``, ``clipfrac``, ``approx_kl``, ``response_length``, ``kl_coef`` (rlhf_ppo_*); the RM and PPO
gauges are set (and exported at all) only by jobs of that kind, from the first time they are. Every key lands
in metrics.jsonl and in JobStatus.metrics. ``tokens`` (per step, all ranks) gives ``tokens_per_second``.

Data parallel (torchrun): create the job after ``torch.distributed`` is initialized. Every rank calls the
same methods in the same order (``end_step``, ``save_checkpoint`` and ``resume`` are collective); only rank 0
serves, logs and writes the model files; each rank writes its own RNG state. Reduce metrics over ranks
yourself before passing them (see rlhf.trainer.distributed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY, Gauge

from rlhf.core.errors import FailedPrecondition
from rlhf.core.logs import setup_logging
from rlhf.core.server import ServerHandle, ServerThread, ServiceDef
from rlhf.trainer.config import TrainJobConfig
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("rlhf.trainer")

SERVICE_NAME = "rlhf.v1.TrainerService"
KINDS = {
    "sft": trainer_pb2.JOB_KIND_SFT,
    "reward_model": trainer_pb2.JOB_KIND_REWARD_MODEL,
    "ppo": trainer_pb2.JOB_KIND_PPO,
}
PHASES = ("generate", "score", "reference", "values", "update", "sync", "idle", "eval", "checkpoint")
TERMINAL_STATES = (
    trainer_pb2.JOB_STATE_SUCCEEDED,
    trainer_pb2.JOB_STATE_STOPPED,
    trainer_pb2.JOB_STATE_FAILED,
)

# ---- Prometheus (names fixed in the metrics contract) ------------------------------------------------------

TRAINER_STEP = Gauge("rlhf_trainer_step", "Optimizer steps (PPO: iterations) done.", ["job"])
TRAINER_LOSS = Gauge("rlhf_trainer_loss", "Latest loss, by split (train, eval).", ["job", "split"])
TOKENS_PER_SECOND = Gauge(
    "rlhf_trainer_tokens_per_second", "Tokens trained on per second (last step).", ["job"]
)
PHASE_SECONDS = Gauge(
    "rlhf_trainer_phase_seconds",
    "Seconds the last occurrence of each phase took (generate|score|reference|values|update|sync|idle...).",
    ["job", "phase"],
)
# Job-kind gauges are registered on first use, so a process exports only the series its job sets: an SFT job
# has no rlhf_ppo_* series (an unlabelled Gauge would otherwise be exported as 0 from the moment it exists).
RM_EVAL_ACCURACY_HELP = "Reward model accuracy on held-out comparisons."
PPO_GAUGE_HELP = {
    "reward_mean": "Mean reward-service score of the last rollout.",
    "reward_std": "Standard deviation of the reward-service scores of the last rollout.",
    "kl": "Mean per-sequence KL(policy || reference) of the last rollout.",
    "entropy": "Mean per-token policy entropy of the last rollout.",
    "policy_loss": "PPO clipped policy loss (last iteration mean).",
    "value_loss": "PPO clipped value loss (last iteration mean).",
    "clipfrac": "Fraction of policy ratios clipped (last iteration).",
    "approx_kl": "Approximate KL between the rollout policy and the updated policy.",
    "response_length": "Mean response length in tokens of the last rollout.",
    "kl_coef": "Current KL penalty coefficient.",
}
_KIND_GAUGES: dict[str, Gauge] = {}
_KIND_GAUGES_LOCK = threading.Lock()


def kind_gauge(name: str, help_text: str) -> Gauge:
    """The process-wide gauge ``name``, created (and so exported) the first time a job sets it."""
    with _KIND_GAUGES_LOCK:
        if name not in _KIND_GAUGES:
            _KIND_GAUGES[name] = Gauge(name, help_text)
        return _KIND_GAUGES[name]


def forget_kind_gauges() -> None:
    """Unregister the job-kind gauges set so far: the next job starts exporting none."""
    with _KIND_GAUGES_LOCK:
        for gauge in _KIND_GAUGES.values():
            REGISTRY.unregister(gauge)
        _KIND_GAUGES.clear()


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, bool | int | float | np.floating | np.integer):
        return float(value)
    return None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); each data-parallel rank gets the same seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the safetensors weights of an HF folder into an existing model (tied weights allowed)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{folder}: unexpected weights {result.unexpected_keys[:5]}")
    loaded = {p.data_ptr() for name, p in model.state_dict().items() if name in state}
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if missing:  # a key missing from the file is fine only when it shares storage with a loaded one (tied)
        raise RuntimeError(f"{folder}: missing weights {missing[:5]}")


class JobStopped(Exception):
    """Raised by :meth:`TrainJob.finish` when the job ended before its last step (SIGTERM, Ctrl-C, the Stop
    RPC), after its checkpoint was written: the run is resumable with ``--resume``. The CLI exits with
    :attr:`exit_code` (128 + signal number for SIGTERM/SIGINT, as a killed process would; 3 otherwise), so a
    Kubernetes Job whose pod was stopped is retried rather than marked complete."""

    def __init__(self, message: str, *, step: int, checkpoint: Path | None, reason: str):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
        self.reason = reason

    @property
    def exit_code(self) -> int:
        if self.reason in ("SIGTERM", "SIGINT"):
            return 128 + signal.Signals[self.reason].value
        return 3


class _Tracked:
    def __init__(self, name: str, obj: Any, tokenizer: Any = None):
        self.name = name
        self.obj = obj
        self.tokenizer = tokenizer
        self.is_hf = hasattr(obj, "save_pretrained") and isinstance(obj, torch.nn.Module)


# ---- the gRPC servicer -------------------------------------------------------------------------------------


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Thin adapter: reads the job's status, forwards checkpoint and stop requests to the training loop."""

    def __init__(self, job: TrainJob):
        self.job = job
        self.loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: set[asyncio.Queue] = set()

    # called from the training thread
    def publish(self, status: trainer_pb2.JobStatus) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        data = status.SerializeToString()
        with contextlib.suppress(RuntimeError):  # loop shutting down
            self.loop.call_soon_threadsafe(self._fan_out, data)

    def _fan_out(self, data: bytes) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() > 1000:  # a stalled reader: drop the oldest
                queue.get_nowait()
            queue.put_nowait(data)

    async def GetStatus(self, request, context):
        return trainer_pb2.GetStatusResponse(status=self.job.status())

    async def StreamProgress(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            status = self.job.status()
            yield trainer_pb2.StreamProgressResponse(status=status)
            while status.state not in TERMINAL_STATES:
                status = trainer_pb2.JobStatus.FromString(await queue.get())
                yield trainer_pb2.StreamProgressResponse(status=status)
        finally:
            self._subscribers.discard(queue)

    async def SaveCheckpoint(self, request, context):
        future = self.job.request_checkpoint()
        checkpoint = await asyncio.wrap_future(future)
        return trainer_pb2.SaveCheckpointResponse(checkpoint=checkpoint)

    async def Stop(self, request, context):
        self.job.request_stop(request.reason or "Stop RPC")
        return trainer_pb2.StopResponse(status=self.job.status())


def _server_thread(config: TrainJobConfig, servicer: TrainerServicer) -> ServerThread:
    """The TrainerService in a background thread of the training process (rlhf.core.server.ServerThread)."""

    async def load(handle: ServerHandle) -> None:
        servicer.loop = asyncio.get_running_loop()  # progress is published onto the server's loop

    service = ServiceDef(SERVICE_NAME, servicer, trainer_pb2_grpc.add_TrainerServiceServicer_to_server)
    return ServerThread(config, [service], load=load, name="trainer-grpc")


# ---- the job -----------------------------------------------------------------------------------------------


class TrainJob:
    """The shell around one training loop; see the module docstring for the contract."""

    def __init__(
        self,
        cfg: TrainJobConfig,
        *,
        kind: str,
        total_steps: int,
        snapshot: str | None = None,
        install_signal_handlers: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        self.cfg = cfg
        self.kind = kind
        self.total_steps = int(total_steps)
        self.run_dir = cfg.resolved_run_dir().resolve()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rank, self.world_size = _dist()
        self.is_main = self.rank == 0
        self.snapshot = snapshot if snapshot is not None else (cfg.snapshot or cfg.data_file or "")
        self.step = 0
        self.epoch = 0
        self.metrics: dict[str, float] = {}
        self.checkpoints: list[trainer_pb2.Checkpoint] = []
        self.started_at = time.time()
        self.state = trainer_pb2.JOB_STATE_STARTING
        self.message = ""
        self.final_path: Path | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._stop_reason: str | None = None
        self._stopping = False  # a stop all ranks agreed on at a step boundary (after its checkpoint)
        self._checkpoint_waiters: list[concurrent.futures.Future] = []
        self._phase_times: dict[str, float] = {}
        self._step_started = time.perf_counter()
        self._resume_step = 0
        self._resume_time = time.perf_counter()
        self._install_signals = install_signal_handlers
        self._signalled: signal.Signals | None = None
        self._old_handlers: dict[int, Any] = {}
        self._servicer = TrainerServicer(self)
        self._server: ServerThread | None = None
        self._progress = None
        self._metrics_file = None
        self._entered = False

    # ---- life cycle -------------------------------------------------------------------------------------

    def __enter__(self) -> TrainJob:
        setup_logging(self.cfg.log_level, self.cfg.log_format)
        seed_everything(self.cfg.seed)  # before the caller builds models: a fresh run is reproducible
        self._entered = True
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(exist_ok=True)
            (self.run_dir / "config.json").write_text(
                json.dumps({"kind": self.kind, "config": self.cfg.model_dump(mode="json")}, indent=2)
            )
        _barrier()
        if self._install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        if self.is_main and self.cfg.serve:
            self._server = _server_thread(self.cfg, self._servicer).start()
            log.info("%s job %s: TrainerService on port %d", self.kind, self.job_id, self._server.port)
        forget_kind_gauges()  # an earlier job of this process (another kind) leaves no series behind
        TRAINER_STEP.labels(self.kind).set(0)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, JobStopped):
            pass  # raised by finish(): the job already ended as STOPPED
        elif exc is not None:
            with self._lock:
                self.state = trainer_pb2.JOB_STATE_FAILED
                self.message = f"{type(exc).__name__}: {exc}"
            log.error("%s job %s failed at step %d: %s", self.kind, self.job_id, self.step, self.message)
            for future in self._take_checkpoint_waiters():
                future.set_exception(FailedPrecondition(f"job failed: {self.message}"))
        elif self.state not in TERMINAL_STATES:
            self.finish(self.final_path)
        self._close()
        if exc is None and self._signalled is not None and self.completed:
            # SIGINT/SIGTERM arrived when no step was left to stop at: the job completed, but whoever sent the
            # signal (Ctrl-C in `rlhf demo`, a pod's SIGTERM) still wants the process to stop; the handlers
            # the job replaced are back, so deliver it to them now.
            signal.raise_signal(self._signalled)

    def _close(self) -> None:
        self._publish()
        for future in self._take_checkpoint_waiters():
            future.set_exception(FailedPrecondition("the job has ended"))
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def finish(self, final_path: str | os.PathLike | None = None) -> None:
        """End the job: SUCCEEDED when all steps ran, STOPPED when stopped on request; shuts the server down."""
        with self._lock:
            self.final_path = Path(final_path) if final_path else None
            self.state = trainer_pb2.JOB_STATE_SUCCEEDED if self.completed else trainer_pb2.JOB_STATE_STOPPED
            if self.final_path and self.completed:
                self.message = f"final checkpoint: {self.final_path}"
            elif self._stop_reason:
                self.message = f"stopped at step {self.step} ({self._stop_reason}); resume with --resume"
        if self.is_main:
            log.info("%s job %s: %s", self.kind, self.job_id, self.message or "done")
        if self._entered:
            self._close()
        if not self.completed:
            latest = self.latest_checkpoint()
            raise JobStopped(
                self.message or f"ended at step {self.step} of {self.total_steps}",
                step=self.step,
                checkpoint=latest,
                reason=self._stop_reason or "",
            )

    @property
    def port(self) -> int:
        """The TrainerService port (0 when not serving)."""
        return self._server.port if self._server else 0

    @property
    def metrics_port(self) -> int:
        """The /metrics port (-1 when disabled or not serving)."""
        return self._server.handle.metrics_port if self._server and self._server.handle else -1

    @property
    def job_id(self) -> str:
        return self.run_dir.name

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    @property
    def completed(self) -> bool:
        return self.step >= self.total_steps

    @property
    def done(self) -> bool:
        """True once every step ran, or a stop was requested and its checkpoint written at a step boundary."""
        return self.completed or self._stopping

    # ---- requests from signals and RPCs -----------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: checkpoint at the next step boundary, then stop (again to abort)", name)
        self._signalled = signal.Signals(signum)
        self.request_stop(name)

    def request_stop(self, reason: str) -> None:
        """Checkpoint at the next step boundary, then stop (thread-safe)."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
                if self.state not in TERMINAL_STATES:
                    self.state = trainer_pb2.JOB_STATE_STOPPING
        self._publish()

    def request_checkpoint(self) -> concurrent.futures.Future:
        """A future resolved with the Checkpoint message written at the next step boundary (thread-safe)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.state in TERMINAL_STATES:
                future.set_exception(FailedPrecondition("the job has ended; no checkpoint can be written"))
            else:
                self._checkpoint_waiters.append(future)
        return future

    def _take_checkpoint_waiters(self) -> list[concurrent.futures.Future]:
        with self._lock:
            waiters, self._checkpoint_waiters = self._checkpoint_waiters, []
        return waiters

    # ---- status -----------------------------------------------------------------------------------------

    def status(self) -> trainer_pb2.JobStatus:
        with self._lock:
            elapsed = time.perf_counter() - self._resume_time
            done_here = self.step - self._resume_step
            eta = (self.total_steps - self.step) * elapsed / done_here if done_here > 0 else 0.0
            return trainer_pb2.JobStatus(
                job_id=self.job_id,
                kind=KINDS[self.kind],
                state=self.state,
                step=self.step,
                total_steps=self.total_steps,
                epoch=self.epoch,
                metrics=dict(self.metrics),
                checkpoints=list(self.checkpoints),
                snapshot=self.snapshot,
                started_at=_timestamp(self.started_at),
                message=self.message,
                eta_seconds=max(0.0, eta) if self.state not in TERMINAL_STATES else 0.0,
            )

    def _publish(self) -> None:
        if self.is_main:
            self._servicer.publish(self.status())

    # ---- tracking, checkpoints, resume ------------------------------------------------------------------

    def track(self, name: str, obj: Any, *, tokenizer: Any = None) -> None:
        """Checkpoint ``obj`` under ``name``: an HF model (saved as an HF folder, with ``tokenizer``) or any
        object with ``state_dict()`` / ``load_state_dict()`` (optimizer, scheduler, a value head...).
        Track the unwrapped model, not its DistributedDataParallel wrapper."""
        if not hasattr(obj, "state_dict"):
            raise TypeError(f"{name}: {type(obj).__name__} has no state_dict()")
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            obj = obj.module
        self._tracked[name] = _Tracked(name, obj, tokenizer)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoint_dir / "latest"
        if not pointer.exists():
            return None
        path = self.checkpoint_dir / pointer.read_text().strip()
        return path if (path / "trainer_state.pt").exists() else None

    def resume(self) -> dict:
        """With ``cfg.resume`` and a checkpoint in run_dir: restore every tracked object, the RNG states and
        step/epoch, and return the saved ``train_state``. Otherwise return {} (``__enter__`` seeded the RNGs)."""
        path = self.latest_checkpoint()
        if path is not None and not self.cfg.resume:
            raise FailedPrecondition(
                f"run_dir: {self.run_dir} holds checkpoints of an earlier run (latest {path.name}); pass --resume "
                "to continue it, or choose another --run-dir"
            )
        if path is None:
            if self.cfg.resume:
                log.info("no checkpoint in %s: starting the run from step 0", self.checkpoint_dir)
            elif self.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run in an old folder starts a fresh history
            self._start_running()
            return {}
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state.get("kind") != self.kind:
            raise FailedPrecondition(f"run_dir: {path} is a {state.get('kind')} checkpoint, not {self.kind}")
        for name, tracked in self._tracked.items():
            if tracked.is_hf:
                load_model_weights(tracked.obj, path / name)
            elif name in state["objects"]:
                tracked.obj.load_state_dict(state["objects"][name])
            else:
                raise FailedPrecondition(f"run_dir: {path} has no state for {name!r}")
        rng_file = path / f"rng-rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        else:  # resumed with more ranks than the checkpoint had: seed deterministically per rank
            seed_everything(self.cfg.seed + 1000 * self.rank + state["step"])
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", 0))
        self.checkpoints = [trainer_pb2.Checkpoint.FromString(c) for c in state.get("checkpoints", [])]
        self.metrics = dict(state.get("metrics", {}))
        if self.is_main:
            self._truncate_history(self.step)
        log.info("resumed %s job %s from %s (step %d)", self.kind, self.job_id, path, self.step)
        self._start_running()
        return dict(state.get("train_state", {}))

    def _truncate_history(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
        _write_text_atomic(self.metrics_path, "".join(line + "\n" for line in keep))

    def _start_running(self) -> None:
        with self._lock:
            self._resume_step = self.step
            self._resume_time = time.perf_counter()
            if self.state == trainer_pb2.JOB_STATE_STARTING:
                self.state = trainer_pb2.JOB_STATE_RUNNING
        TRAINER_STEP.labels(self.kind).set(self.step)
        if self.is_main:
            from tqdm.auto import tqdm

            disable = None if self.cfg.progress is None else not self.cfg.progress
            self._progress = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc=f"{self.kind} {self.job_id}",
                unit="step",
                dynamic_ncols=True,
                disable=disable,
            )
            self._metrics_file = open(self.metrics_path, "a", buffering=1)
        self._step_started = time.perf_counter()
        self._publish()

    def save_checkpoint(self, train_state: dict | None = None) -> trainer_pb2.Checkpoint:
        """Write ``checkpoints/step-N`` atomically and point ``latest`` at it (collective under torchrun)."""
        start = time.perf_counter()
        name = f"step-{self.step}"
        final = self.checkpoint_dir / name
        tmp = self.checkpoint_dir / f".{name}.tmp"
        train_state = dict(train_state or {})
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        _barrier()
        checkpoint = trainer_pb2.Checkpoint(
            path=str(final),
            step=self.step,
            created_at=_timestamp(time.time()),
            policy_version=int(train_state.get("policy_version", 0)),
        )
        if self.is_main:
            objects = {}
            for tracked_name, tracked in self._tracked.items():
                if tracked.is_hf:
                    tracked.obj.save_pretrained(tmp / tracked_name, safe_serialization=True)
                    if tracked.tokenizer is not None:
                        tracked.tokenizer.save_pretrained(tmp / tracked_name)
                else:
                    objects[tracked_name] = tracked.obj.state_dict()
            checkpoints = [*self.checkpoints, checkpoint]
            torch.save(
                {
                    "kind": self.kind,
                    "step": self.step,
                    "epoch": self.epoch,
                    "objects": objects,
                    "train_state": train_state,
                    "metrics": dict(self.metrics),
                    "checkpoints": [c.SerializeToString() for c in checkpoints],
                    "world_size": self.world_size,
                },
                tmp / "trainer_state.pt",
            )
            _fsync_tree(tmp)
            if final.exists():  # the same step saved twice (e.g. a requested and a periodic checkpoint)
                shutil.rmtree(final)
            tmp.rename(final)
            _write_text_atomic(self.checkpoint_dir / "latest", name + "\n")
            with self._lock:
                self.checkpoints = [c for c in checkpoints if c.path != str(final) or c is checkpoint]
            self._prune_checkpoints()
            log.info("checkpoint %s (%.1fs)", final, time.perf_counter() - start)
        _barrier()
        self._record_phase("checkpoint", time.perf_counter() - start)
        return checkpoint

    def _prune_checkpoints(self) -> None:
        kept = self.checkpoints[-self.cfg.keep_checkpoints :]
        keep_paths = {c.path for c in kept}
        for c in self.checkpoints:
            if c.path not in keep_paths and Path(c.path).exists():
                shutil.rmtree(c.path, ignore_errors=True)
        with self._lock:
            self.checkpoints = kept

    # ---- the step boundary ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the step (generate, score, reference, values, update, sync, idle, eval)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._record_phase(name, time.perf_counter() - start)

    def _record_phase(self, name: str, seconds: float) -> None:
        self._phase_times[name] = self._phase_times.get(name, 0.0) + seconds
        PHASE_SECONDS.labels(self.kind, name).set(seconds)

    def _agree(self, *flags: bool) -> list[bool]:
        """Flags OR-ed over all ranks (stop and checkpoint requests reach rank 0 or one rank's signal)."""
        if self.world_size == 1:
            return list(flags)
        nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        tensor = torch.tensor([float(f) for f in flags], device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return [bool(x) for x in tensor.tolist()]

    def end_step(
        self,
        metrics: dict[str, Any] | None = None,
        *,
        train_state: dict | None = None,
        tokens: int | None = None,
        epoch: int | None = None,
        evaluate: Callable[[], dict[str, Any]] | None = None,
    ) -> bool:
        """Close one optimizer step (PPO: iteration); returns ``not job.done``. See the module docstring."""
        self.step += 1
        if epoch is not None:
            self.epoch = int(epoch)
        values: dict[str, float] = {}
        for key, value in (metrics or {}).items():
            number = _to_float(value)
            if number is not None:
                values[key] = number
        step_seconds = time.perf_counter() - self._step_started
        if tokens:
            values["tokens_per_second"] = tokens / max(step_seconds, 1e-9)
        values["step_seconds"] = step_seconds
        for phase_name, seconds in self._phase_times.items():
            values[f"time/{phase_name}"] = seconds
        self._phase_times = {}
        eval_due = evaluate is not None and (
            self.step >= self.total_steps or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)
        )
        if eval_due:
            with self.phase("eval"):
                for key, value in evaluate().items():
                    number = _to_float(value)
                    if number is not None:
                        values[key] = number
        self.log(values)
        stop, wanted = self._agree(self.stop_requested, bool(self._checkpoint_waiters))
        if stop and not self.stop_requested:
            self.request_stop("stop requested on another rank")
        periodic = bool(self.cfg.checkpoint_every) and self.step % self.cfg.checkpoint_every == 0
        if stop or wanted or periodic:
            checkpoint = self.save_checkpoint(train_state)
            for future in self._take_checkpoint_waiters():
                future.set_result(checkpoint)
        self._stopping = stop
        self._publish()
        self._step_started = time.perf_counter()
        return not self.done

    def log(self, metrics: dict[str, float]) -> None:
        """Record metrics at the current step: metrics.jsonl, Prometheus, status, progress bar (rank 0)."""
        with self._lock:
            self.metrics.update(metrics)
        TRAINER_STEP.labels(self.kind).set(self.step)
        if not self.is_main:
            return
        for key, value in metrics.items():
            if key == "loss":
                TRAINER_LOSS.labels(self.kind, "train").set(value)
            elif key == "eval_loss":
                TRAINER_LOSS.labels(self.kind, "eval").set(value)
            elif key == "tokens_per_second":
                TOKENS_PER_SECOND.labels(self.kind).set(value)
            elif key == "eval_accuracy" and self.kind == "reward_model":
                kind_gauge("rlhf_rm_eval_accuracy", RM_EVAL_ACCURACY_HELP).set(value)
            elif key in PPO_GAUGE_HELP and self.kind == "ppo":
                kind_gauge(f"rlhf_ppo_{key}", PPO_GAUGE_HELP[key]).set(value)
        record = {"step": self.step, "epoch": self.epoch, "time": round(time.time(), 3), **metrics}
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
        if self._progress is not None:
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if "/" not in k and k != "step_seconds"}
            self._progress.set_postfix(shown, refresh=False)
            self._progress.n = self.step
            self._progress.refresh()
        elif not sys.stderr.isatty() and metrics:
            log.debug("step %d: %s", self.step, metrics)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The metrics history of a run (``run_dir/metrics.jsonl``), oldest first."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
