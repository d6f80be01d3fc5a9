"""Pieces the supervised jobs (SFT, reward model) share: the step plan, the data order, optimizer and schedule.

The data order is a function of (seed, epoch) only, and the batch of a step a function of the step number,
so a resumed run (and every data-parallel rank) reads exactly the batches an uninterrupted run reads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rlhf.core.errors import FailedPrecondition
from rlhf.rl.optim import grad_norm, weight_decay_groups
from rlhf.trainer.config import TrainJobConfig


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    batch_size: int  # global

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of the step with this 0-based number."""
        return divmod(step, self.steps_per_epoch)


def plan_steps(cfg: TrainJobConfig, num_examples: int, world_size: int = 1) -> StepPlan:
    """Whole global batches per epoch (the last partial batch of an epoch is left out) and the step budget."""
    if num_examples == 0:
        raise ValueError("data: no training examples")
    if cfg.batch_size > num_examples:
        raise ValueError(
            f"batch_size: {cfg.batch_size} is larger than the training set ({num_examples} examples)"
        )
    if cfg.batch_size < world_size:
        raise ValueError(f"batch_size: {cfg.batch_size} is smaller than the number of ranks ({world_size})")
    steps_per_epoch = num_examples // cfg.batch_size
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return StepPlan(steps_per_epoch, total, cfg.batch_size)


def check_resumed_plan(train_state: dict, plan: StepPlan, num_examples: int) -> None:
    """A resumed run must read the same batches: same global batch size and training set size."""
    saved = (train_state.get("batch_size"), train_state.get("num_examples"))
    if train_state and saved != (plan.batch_size, num_examples):
        raise FailedPrecondition(
            f"resume: the checkpoint was taken with batch_size={saved[0]} over {saved[1]} examples, this run "
            f"has batch_size={plan.batch_size} over {num_examples}; the data order would not continue"
        )


def plan_state(plan: StepPlan, step: int, num_examples: int) -> dict:
    """The data position saved with a checkpoint after ``step`` steps."""
    epoch, index = plan.position(step)
    return {"epoch": epoch, "batch": index, "batch_size": plan.batch_size, "num_examples": num_examples}


def batch_indices(
    plan: StepPlan, step: int, num_examples: int, seed: int, groups: Sequence[int] | None = None
) -> list[int]:
    """Indices of the global batch of ``step`` (0-based): a fresh permutation per epoch. With ``groups`` (a
    group id per example) the permutation keeps each group's examples together (:func:`grouped_permutation`)."""
    epoch, index = plan.position(step)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    if groups is None:
        order = torch.randperm(num_examples, generator=generator)
    else:
        if len(groups) != num_examples:
            raise ValueError(f"groups: {len(groups)} group ids for {num_examples} examples")
        order = grouped_permutation(groups, generator)
    return order[index * plan.batch_size : (index + 1) * plan.batch_size].tolist()


def grouped_permutation(groups: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(len(groups))`` in which the examples of one group are neighbours: the groups
    in random order, each group's examples in random order (``groups[i]`` = group id of example i)."""
    ids = torch.as_tensor(list(groups), dtype=torch.long)
    distinct, group_of = torch.unique(ids, return_inverse=True)
    group_rank = torch.randperm(len(distinct), generator=generator)
    within = torch.randperm(len(ids), generator=generator)
    return torch.argsort(group_rank[group_of] * len(ids) + within)


def chunks(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def make_optimizer(cfg: TrainJobConfig, parameters) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm weights (1-D tensors)."""
    groups = weight_decay_groups(parameters, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas))


def accumulating(ddp_module: torch.nn.Module, micro_batches: list, distributed: bool) -> Iterator:
    """Yield each micro-batch; under DDP all but the last inside ``no_sync()``, so the gradients are
    all-reduced once per optimizer step."""
    for k, micro in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with ddp_module.no_sync() if distributed and not last else contextlib.nullcontext():
            yield micro


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step the optimizer and the schedule, clear the gradients; returns the norm before clipping."""
    norm = float(grad_norm(model.parameters(), max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
