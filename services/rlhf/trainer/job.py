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

    with TrainJob(cfg, kind="sft", total_steps=n_steps, eval_every=cfg.eval_every) as job:  # seeds with cfg.seed
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

``finish`` raises :class:`JobStopped` when the job stopped before its last step (its checkpoint is written;
``--resume`` continues it). ``end_step`` increments ``job.step``, calls ``evaluate()`` when due (every
``eval_every`` steps given to TrainJob, and at the last step), logs, and checkpoints when due (every
``cfg.checkpoint_every`` steps), when a SaveCheckpoint RPC asked for one, or when a stop was requested (then ``job.done`` is true).
``train_state`` must be torch-saveable (ints, floats, lists, dicts, tensors); put the data position there
(e.g. epoch and batch index) and, for PPO, anything the loop needs to continue (KL controller value, policy
version: the key ``policy_version`` is also reported in the Checkpoint message). Call ``job.save_checkpoint()``
yourself e.g. before ending the job on an unrecoverable service error, when the tracked state is consistent.
An exception leaving the ``with`` block marks the job FAILED (message = the error) and re-raises.

Metrics: see rlhf.trainer.metrics (which keys have a Prometheus gauge); every key lands in metrics.jsonl and
in JobStatus.metrics. ``tokens`` (per step, all ranks) gives ``tokens_per_second``.

Data parallel (torchrun): create the job after ``torch.distributed`` is initialized. Every rank calls the
same methods in the same order (``end_step``, ``save_checkpoint`` and ``resume`` are collective); only rank 0
serves, logs and writes the model files; each rank writes its own RNG state. Reduce metrics over ranks
yourself before passing them (see rlhf.trainer.distributed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf.core.errors import FailedPrecondition
from rlhf.core.logs import setup_logging
from rlhf.core.server import ServerThread
from rlhf.trainer import checkpointing as ckpt
from rlhf.trainer import distributed
from rlhf.trainer.config import TrainJobConfig
from rlhf.trainer.metrics import (
    PHASE_SECONDS,
    TRAINER_STEP,
    export_gauges,
    forget_kind_gauges,
    numbers,
    progress_bar,
    show_progress,
    truncate_history,
)
from rlhf.trainer.service import KINDS, TERMINAL_STATES, TrainerServicer, server_thread, timestamp
from rlhf.v1 import trainer_pb2

log = logging.getLogger("rlhf.trainer")


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


class TrainJob:
    """The shell around one training loop; see the module docstring for the contract."""

    def __init__(
        self,
        cfg: TrainJobConfig,
        *,
        kind: str,
        total_steps: int,
        snapshot: str | None = None,
        eval_every: int = 0,
        install_signal_handlers: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        self.cfg = cfg
        self.kind = kind
        self.total_steps = int(total_steps)
        self.eval_every = int(eval_every)
        self.run_dir = cfg.resolved_run_dir().resolve()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rank, self.world_size = distributed.rank_and_world_size()
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
        self._tracked: dict[str, ckpt.Tracked] = {}
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
        ckpt.seed_everything(self.cfg.seed)  # before the caller builds models: a fresh run is reproducible
        self._entered = True
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(exist_ok=True)
            (self.run_dir / "config.json").write_text(
                json.dumps({"kind": self.kind, "config": self.cfg.public_dump()}, indent=2)
            )
        distributed.barrier()
        if self._install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        if self.is_main and self.cfg.serve:
            self._server = server_thread(self.cfg, self._servicer).start()
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
        self._signalled = signal.Signals(signum)  # flags only, no lock (the main thread may hold it)
        self._stop_reason = self._stop_reason or name

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
                started_at=timestamp(self.started_at),
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
        self._tracked[name] = ckpt.Tracked(name, obj, tokenizer)

    def latest_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.checkpoint_dir)

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
        state = ckpt.read_trainer_state(path, self.kind)
        ckpt.restore_tracked(path, self._tracked, state)
        ckpt.restore_rng(path, self.rank, self.cfg.seed, state["step"])
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", 0))
        self.checkpoints = [trainer_pb2.Checkpoint.FromString(c) for c in state.get("checkpoints", [])]
        self.metrics = dict(state.get("metrics", {}))
        if self.is_main:
            truncate_history(self.metrics_path, self.step)
        log.info("resumed %s job %s from %s (step %d)", self.kind, self.job_id, path, self.step)
        self._start_running()
        return dict(state.get("train_state", {}))

    def _start_running(self) -> None:
        with self._lock:
            self._resume_step = self.step
            self._resume_time = time.perf_counter()
            if self.state == trainer_pb2.JOB_STATE_STARTING:
                self.state = trainer_pb2.JOB_STATE_RUNNING
        TRAINER_STEP.labels(self.kind).set(self.step)
        if self.is_main:
            desc = f"{self.kind} {self.job_id}"
            self._progress = progress_bar(self.total_steps, self.step, desc, self.cfg.progress)
            self._metrics_file = open(self.metrics_path, "a", buffering=1)
        self._step_started = time.perf_counter()
        self._publish()

    def save_checkpoint(self, train_state: dict | None = None) -> trainer_pb2.Checkpoint:
        """Write ``checkpoints/step-N`` atomically and point ``latest`` at it (collective under torchrun)."""
        start = time.perf_counter()
        final = self.checkpoint_dir / f"step-{self.step}"
        tmp = self.checkpoint_dir / f".{final.name}.tmp"  # one name for every rank: each adds its RNG state
        train_state = dict(train_state or {})
        if self.is_main:
            ckpt.new_checkpoint_folder(tmp)
        distributed.barrier()
        torch.save(ckpt.rng_state(), tmp / f"rng-rank{self.rank}.pt")
        distributed.barrier()
        checkpoint = trainer_pb2.Checkpoint(
            path=str(final),
            step=self.step,
            created_at=timestamp(time.time()),
            policy_version=int(train_state.get("policy_version", 0)),
        )
        if self.is_main:
            checkpoints = [*self.checkpoints, checkpoint]
            record = {
                "kind": self.kind,
                "step": self.step,
                "epoch": self.epoch,
                "train_state": train_state,
                "metrics": dict(self.metrics),
                "checkpoints": [c.SerializeToString() for c in checkpoints],
                "world_size": self.world_size,
            }
            ckpt.write_tracked(tmp, self._tracked, record)
            ckpt.publish_checkpoint(tmp, final)
            with self._lock:
                self.checkpoints = [c for c in checkpoints if c.path != str(final) or c is checkpoint]
            self._prune_checkpoints()
            log.info("checkpoint %s (%.1fs)", final, time.perf_counter() - start)
        distributed.barrier()
        self._record_phase("checkpoint", time.perf_counter() - start)
        return checkpoint

    def _prune_checkpoints(self) -> None:
        kept = ckpt.prune_checkpoints(self.checkpoints, self.cfg.keep_checkpoints)
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
        values = numbers(metrics or {})
        step_seconds = time.perf_counter() - self._step_started
        if tokens:
            values["tokens_per_second"] = tokens / max(step_seconds, 1e-9)
        values["step_seconds"] = step_seconds
        for phase_name, seconds in self._phase_times.items():
            values[f"time/{phase_name}"] = seconds
        self._phase_times = {}
        eval_due = evaluate is not None and (
            self.step >= self.total_steps or (self.eval_every and self.step % self.eval_every == 0)
        )
        if eval_due:
            with self.phase("eval"):
                values.update(numbers(evaluate()))
        self.log(values)
        stop, wanted = distributed.any_over_ranks(self.stop_requested, bool(self._checkpoint_waiters))
        if stop:  # a signal's flag, the Stop RPC or another rank
            self.request_stop(self._stop_reason or "stop requested on another rank")
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
        export_gauges(self.kind, metrics)
        record = {"step": self.step, "epoch": self.epoch, "time": round(time.time(), 3), **metrics}
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
        if self._progress is not None:
            show_progress(self._progress, self.step, metrics)
        elif not sys.stderr.isatty() and metrics:
            log.debug("step %d: %s", self.step, metrics)
