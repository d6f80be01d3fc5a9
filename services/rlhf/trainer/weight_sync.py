"""Weight sync: the generation service serves the trainer's current policy, with versions that only move forward.

Weight pushes go through a file: the policy's tensors are written as one safetensors file under ``push_dir``
(``/dev/shm`` by default, memory on one host) and the service reads it from the path; with ``push_dir: ''``
the bytes are streamed over gRPC instead (another host).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file
from torch import nn

from rlhf.core.client import call_with_retry
from rlhf.core.files import atomic_path

log = logging.getLogger("rlhf.trainer.weight_sync")


def is_code(exc: BaseException, *codes: grpc.StatusCode) -> bool:
    """Whether ``exc`` is a gRPC error with one of ``codes``."""
    return isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in codes


def policy_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied duplicates dropped (as save_pretrained), contiguous for safetensors."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous()
    return state


class PolicySync:
    """Keeps the generation service serving the trainer's weights, with versions that only move forward."""

    def __init__(self, client, push_dir: str, run_name: str):
        self.client = client
        self.push_dir = Path(push_dir) / f"rlhf-ppo-{run_name}-{os.getpid()}" if push_dir else None
        self.version = 0  # version of the trainer's current weights
        self.served: int | None = None  # version the service serves for us (None = unknown / must push)
        self._pushed_files: list[Path] = []
        self.max_batch_size = 1 << 30  # most sequences per Generate request (from the service's ModelInfo)

    def service_version(self) -> int:
        info = self.client.model_info()
        self.max_batch_size = int(info.max_batch_size) or self.max_batch_size
        return int(info.version or 0)

    def push(self, model: nn.Module, attempts: int = 3) -> int:
        """Push the current weights unless the service already serves them; returns the served version.

        Versions only move forward: when the service serves a version >= ours (a resumed run, or another pusher
        got there first, between our read and our push) the weights go out under the next free number."""
        current = self.service_version()
        if self.served == self.version and current == self.version:
            return self.version
        state = policy_state_dict(model)
        for attempt in range(attempts):
            if current >= self.version:  # e.g. resumed after the killed run had pushed further: renumber
                self.version = current + 1
            try:
                served = self._send(state)
                break
            except grpc.RpcError as exc:
                if not is_code(exc, grpc.StatusCode.FAILED_PRECONDITION) or attempt == attempts - 1:
                    raise
                current = self.service_version()
                if current < self.version:  # refused for another reason (e.g. a backend without updates)
                    raise
                log.warning(
                    "generation service moved to version %d while version %d was on its way: pushing as %d",
                    current,
                    self.version,
                    current + 1,
                )
        if int(served) != self.version:
            raise RuntimeError(f"generation service serves version {served} after pushing {self.version}")
        self.served = self.version
        return self.version

    def _send(self, state: dict) -> int:
        """One UpdateWeights of ``state`` as ``self.version`` (by file path when push_dir is set)."""
        source: dict = {"state_dict": state}
        if self.push_dir is not None:
            self.push_dir.mkdir(parents=True, exist_ok=True)
            path = self.push_dir / f"policy-v{self.version}.safetensors"
            with atomic_path(path) as tmp:
                save_file(state, str(tmp))
            self._pushed_files.append(path)
            source = {"checkpoint_path": str(path)}
        served = call_with_retry(
            lambda: self.client.update_weights(version=self.version, **source),
            self.client.retry,
            "PolicyService.UpdateWeights",
        )
        if self.push_dir is not None:
            for old in self._pushed_files[:-1]:  # keep the newest file: a restarted service may need it
                old.unlink(missing_ok=True)
            self._pushed_files = self._pushed_files[-1:]
        return served

    def close(self) -> None:
        if self.push_dir is not None:
            shutil.rmtree(self.push_dir, ignore_errors=True)
