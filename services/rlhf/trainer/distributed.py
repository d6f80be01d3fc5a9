"""Data parallelism with torch.distributed (DDP): gloo on CPU, NCCL on GPUs, started by ``torchrun``.

``torchrun --nproc_per_node 2 -m rlhf.cli train sft ...`` (or ``--nnodes N --rdzv-endpoint HOST:PORT`` over
several machines) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; :func:`setup` joins the process group
when WORLD_SIZE > 1 and does nothing otherwise, so the same code runs as one process.

Equivalence with one process: every optimizer step consumes one *global* batch (``cfg.batch_size``
examples), split across ranks by :func:`shard` (rank r takes examples r, r+W, r+2W, ...). Losses are sums
over the rank's examples divided by the global count, times the world size, so after DDP averages the
gradients over ranks the update is the one a single process computes on the whole batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("rlhf.trainer.distributed")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device: str = "auto") -> DistInfo:
    """Join the process group under torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's share of a global batch: items rank, rank + W, rank + 2W, ..."""
    return list(items[rank::world_size])


def all_reduce_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Elementwise sum of ``values`` over all ranks (the values themselves on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel when running on several ranks, else itself."""
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if rank_and_world_size()[1] > 1:
        dist.barrier()


def any_over_ranks(*flags: bool) -> list[bool]:
    """Flags OR-ed over all ranks (collective: every rank calls it with as many flags)."""
    if rank_and_world_size()[1] == 1:
        return list(flags)
    nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(x) for x in tensor.tolist()]
