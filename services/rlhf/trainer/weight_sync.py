"""Weight sync: the generation service serves the trainer's current policy, with versions that only move forward.

Weight pushes go through a file: the policy's tensors are written as one safetensors file under ``push_dir``
(``/dev/shm`` by default, memory on one host) and the service reads it from the path; with ``push_dir: ''``
the bytes are streamed over gRPC instead (another host).

The generation target may name many replicas (a list, or a DNS name such as a headless Service): every push
re-resolves it, asks each replica which version it serves, and pushes to every replica that is not at the
trainer's version — all of them after an update, only the newcomer when a replica joined or restarted — in
parallel. A replica that does not answer is skipped (logged) and caught up at the next push.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file
from torch import nn

from rlhf.core.client import call_with_retry, replica_addresses
from rlhf.core.errors import ServiceDown
from rlhf.core.files import atomic_path
from rlhf.v1 import common_pb2

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
    """Keeps every generation replica serving the trainer's weights, with versions that only move forward.

    ``client`` is the balanced client the rollouts call; ``replica_client(address)`` makes a client of one
    replica (None: the target is one service, reached through ``client``).
    """

    def __init__(
        self, client, push_dir: str, run_name: str, replica_client: Callable[[str], object] | None = None
    ):
        self.client = client
        self.push_dir = Path(push_dir) / f"rlhf-ppo-{run_name}-{os.getpid()}" if push_dir else None
        self.version = 0  # version of the trainer's current weights
        self.served: int | None = None  # version the replicas serve for us (None = unknown / must push)
        self._pushed_files: list[Path] = []
        self.max_batch_size = (
            1 << 30
        )  # most sequences per Generate request (the smallest replica's ModelInfo)
        self._replica_client = replica_client
        self._replicas: dict[str, object] = {}

    def replicas(self) -> dict[str, object]:
        """The replicas the target names now (re-resolved): address -> client; joins and leaves are logged."""
        if self._replica_client is None:
            return {self.client.target: self.client}
        addresses = replica_addresses(self.client.target)
        for gone in sorted(set(self._replicas) - set(addresses)):
            log.warning("generation replica %s left", gone)
            self._replicas.pop(gone).close()
        for new in sorted(set(addresses) - set(self._replicas)):
            if self._replicas:
                log.warning("generation replica %s joined: it gets the current weights before it serves", new)
            self._replicas[new] = self._replica_client(new)
        return dict(self._replicas)

    def _info(self, client) -> common_pb2.ModelInfo | None:
        try:
            return client.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).model
        except grpc.RpcError as exc:
            if self._replica_client is None or not is_code(
                exc, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED
            ):
                raise
            log.warning(
                "generation replica %s does not answer (%s): skipped this push", client.target, exc.code()
            )
            return None

    def _answering(self) -> dict[str, common_pb2.ModelInfo]:
        infos = {a: self._info(c) for a, c in self.replicas().items()}
        return {a: i for a, i in infos.items() if i is not None}

    def replica_versions(self) -> dict[str, int]:
        """The version every answering replica serves (and the smallest max_batch_size among them)."""
        if self._replica_client is None:
            info = self.client.model_info()
            infos = {self.client.target: info}
        else:
            infos = self._answering()
            if (
                not infos
            ):  # every replica restarting: wait for one within the job's retry window, then ask all
                self.client.model_info()
                infos = self._answering()
            if not infos:
                raise ServiceDown(
                    f"no generation replica of {self.client.target} answers", service="generation"
                )
        sizes = [int(i.max_batch_size) for i in infos.values() if i.max_batch_size]
        self.max_batch_size = min(sizes) if sizes else self.max_batch_size
        return {a: int(i.version or 0) for a, i in infos.items()}

    def service_version(self) -> int:
        """The newest version any replica serves."""
        return max(self.replica_versions().values())

    def _targets(self, versions: dict[str, int]) -> list[str]:
        """The replicas to push to, renumbering first when a replica is ahead of (or may not hold) our version."""
        top = max(versions.values())
        if top > self.version or (top == self.version and self.served != self.version):
            self.version = top + 1  # e.g. resumed after the killed run had pushed further
            return sorted(versions)
        return sorted(a for a, v in versions.items() if v != self.version)

    def push(self, model: nn.Module, attempts: int = 3) -> int:
        """Bring every replica to the trainer's weights unless they serve them already; returns the version.

        Versions only move forward: when a replica serves a version >= ours (a resumed run, or another pusher
        got there first, between our read and our push) the weights go out under the next free number."""
        versions = self.replica_versions()
        if self.served == self.version and all(v == self.version for v in versions.values()):
            return self.version
        state = policy_state_dict(model)
        for attempt in range(attempts):
            targets = self._targets(versions)
            try:
                self._send_to(state, targets)
                break
            except grpc.RpcError as exc:
                if not is_code(exc, grpc.StatusCode.FAILED_PRECONDITION) or attempt == attempts - 1:
                    raise
                versions = self.replica_versions()
                if (
                    max(versions.values()) < self.version
                ):  # refused for another reason (a backend without updates)
                    raise
                log.warning(
                    "a generation replica moved past version %d while it was on its way", self.version
                )
                self.served = None
        self.served = self.version
        return self.version

    def _send_to(self, state: dict, targets: list[str]) -> None:
        """One UpdateWeights of ``state`` as ``self.version`` to each target replica, in parallel."""
        source = self._source(state)
        # the replicas replica_versions() just resolved: the targets were chosen among them (no second lookup)
        clients = self._replicas if self._replica_client is not None else {self.client.target: self.client}
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            served = dict(
                zip(targets, pool.map(lambda a: self._send(clients[a], source), targets), strict=True)
            )
        wrong = {a: v for a, v in served.items() if int(v) != self.version}
        if wrong:
            raise RuntimeError(f"generation replicas serve {wrong} after pushing version {self.version}")
        if self.push_dir is not None:
            for old in self._pushed_files[:-1]:  # keep the newest file: a restarted service may need it
                old.unlink(missing_ok=True)
            self._pushed_files = self._pushed_files[-1:]

    def _source(self, state: dict) -> dict:
        """How the bytes travel: a file every replica reads (push_dir), or the state streamed to each."""
        if self.push_dir is None:
            return {"state_dict": state}
        self.push_dir.mkdir(parents=True, exist_ok=True)
        path = self.push_dir / f"policy-v{self.version}.safetensors"
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        self._pushed_files.append(path)
        return {"checkpoint_path": str(path)}

    def _send(self, client, source: dict) -> int:
        return call_with_retry(
            lambda: client.update_weights(version=self.version, **source),
            client.retry,
            "PolicyService.UpdateWeights",
        )

    def close(self) -> None:
        for client in self._replicas.values():
            client.close()
        self._replicas.clear()
        if self.push_dir is not None:
            shutil.rmtree(self.push_dir, ignore_errors=True)
