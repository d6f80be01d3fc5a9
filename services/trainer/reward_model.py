"""``rlhf train reward-model``: a scalar reward model on preference pairs, Bradley–Terry loss.

The model starts from a causal LM (usually the SFT model) with its LM head replaced by a zero-mean scalar
head (rlhf.core.models.init_reward_model_from_causal_lm). A pair is scored as the reward service scores it:
prompt + response + EOS with the chat template (rlhf.core.chat), the score read at the last real token
(rlhf.core.models.reward_forward). Loss per pair: ``-log sigmoid(r_chosen - r_rejected)`` (plus an optional
``center_rewards_coef * (r_chosen + r_rejected)^2``), averaged over the global batch. Held-out accuracy is
the share of eval pairs with ``r_chosen > r_rejected``.

The final checkpoint (``run_dir/final``) is written with rlhf.reward.checkpoint.save_reward_checkpoint and
carries the mean and standard deviation of the final model's scores over the training responses, which the
reward service uses for normalized scores.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.core.models import (
    init_reward_model_from_causal_lm,
    load_tokenizer,
    resolve_model_path,
    reward_forward,
    set_torch_threads,
)
from rlhf.trainer import distributed
from rlhf.trainer.config import RewardModelConfig
from rlhf.trainer.data import encode_scored_text, load_comparisons, pad_right
from rlhf.trainer.job import TrainJob
from rlhf.trainer.loop import (
    batch_indices,
    check_resumed_plan,
    chunks,
    clip_gradients,
    make_optimizer,
    make_scheduler,
    plan_state,
    plan_steps,
)

log = logging.getLogger("rlhf.trainer.reward_model")

Pair = tuple[list[int], list[int]]  # (chosen ids, rejected ids)


class RewardScorer(torch.nn.Module):
    """reward_forward as a module, so that DistributedDataParallel sees the forward pass."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_forward(self.model, input_ids, attention_mask)


def encode_pairs(tokenizer, comparisons, max_length: int) -> list[Pair]:
    return [
        (
            encode_scored_text(tokenizer, c.prompt, c.chosen, max_length),
            encode_scored_text(tokenizer, c.prompt, c.rejected, max_length),
        )
        for c in comparisons
    ]


def score_pairs(scorer, pairs: list[Pair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) in one forward pass over 2B sequences."""
    ids, mask = pad_right([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    rewards = scorer(ids.to(device), mask.to(device))
    return rewards[: len(pairs)], rewards[len(pairs) :]


def bradley_terry_loss_sum(
    chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0
) -> torch.Tensor:
    """Sum over pairs of -log sigmoid(r_chosen - r_rejected) (+ center_coef * (r_chosen + r_rejected)^2)."""
    loss = -F.logsigmoid(chosen - rejected)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss.sum()


@torch.no_grad()
def evaluate_pairs(scorer, pairs: list[Pair], cfg: RewardModelConfig, info, pad_id: int) -> dict:
    """eval_loss (mean Bradley–Terry loss), eval_accuracy and eval_margin over ``pairs`` (sharded)."""
    if not pairs:
        return {}
    was_training = scorer.training
    scorer.eval()
    loss, correct, margin, count = 0.0, 0.0, 0.0, 0
    for batch in chunks(distributed.shard(pairs, info.rank, info.world_size), cfg.eval_batch_size):
        chosen, rejected = score_pairs(scorer, batch, pad_id, info.device)
        loss += float(bradley_terry_loss_sum(chosen, rejected))
        correct += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        count += len(batch)
    loss, correct, margin, count = distributed.all_reduce_sum([loss, correct, margin, count], info.device)
    scorer.train(was_training)
    return {"eval_loss": loss / count, "eval_accuracy": correct / count, "eval_margin": margin / count}


@torch.no_grad()
def reward_statistics(
    scorer, sequences: list[list[int]], batch_size: int, info, pad_id: int
) -> tuple[float, float]:
    """(mean, std) of the scores of ``sequences`` (sharded over ranks)."""
    scorer.eval()
    total, total_sq, count = 0.0, 0.0, 0
    for batch in chunks(distributed.shard(sequences, info.rank, info.world_size), batch_size):
        ids, mask = pad_right(batch, pad_id)
        scores = scorer(ids.to(info.device), mask.to(info.device)).double()
        total += float(scores.sum())
        total_sq += float((scores**2).sum())
        count += len(batch)
    total, total_sq, count = distributed.all_reduce_sum([total, total_sq, count], info.device)
    mean = total / max(count, 1)
    var = max(0.0, total_sq / max(count, 1) - mean**2)
    return mean, math.sqrt(var)


def run_reward_model(cfg: RewardModelConfig) -> Path:
    """Run (or resume) a reward-model job; returns the final reward checkpoint folder (a stopped job raises
    rlhf.trainer.job.JobStopped after writing its checkpoint)."""
    from rlhf.reward.checkpoint import save_reward_checkpoint

    set_torch_threads(cfg.torch_threads)
    info = distributed.setup(cfg.device)
    try:
        data = load_comparisons(cfg, cfg.rating_margin)
        tokenizer = load_tokenizer(cfg.model)
        train = encode_pairs(tokenizer, data.train, cfg.max_length)
        evals = encode_pairs(tokenizer, data.eval, cfg.max_length)
        plan = plan_steps(cfg, len(train), info.world_size)
        log.info(
            "reward model on %d train / %d eval pairs: %d steps of %d",
            len(train),
            len(evals),
            plan.total_steps,
            plan.batch_size,
        )
        with TrainJob(cfg, kind="reward_model", total_steps=plan.total_steps) as job:
            model, tokenizer = init_reward_model_from_causal_lm(cfg.model)  # inside the job: seeded head
            model.to(info.device).train()
            scorer = RewardScorer(model)
            ddp_scorer = distributed.wrap(scorer, info)
            optimizer = make_optimizer(cfg, model.parameters())
            scheduler = make_scheduler(cfg, optimizer, plan.total_steps)
            job.track("model", model, tokenizer=tokenizer)
            job.track("optimizer", optimizer)
            job.track("scheduler", scheduler)
            check_resumed_plan(job.resume(), plan, len(train))
            pad_id = tokenizer.pad_token_id

            while not job.done:
                epoch, index = plan.position(job.step)
                global_batch = batch_indices(plan, job.step, len(train), cfg.seed)
                mine = [train[i] for i in distributed.shard(global_batch, info.rank, info.world_size)]
                micro_batches = list(chunks(mine, cfg.micro_batch_size))
                loss_sum, correct = 0.0, 0.0
                n_tokens = sum(len(c) + len(r) for c, r in mine)
                with job.phase("update"):
                    for k, micro in enumerate(micro_batches):
                        sync = k == len(micro_batches) - 1
                        no_sync = (
                            ddp_scorer.no_sync() if info.enabled and not sync else contextlib.nullcontext()
                        )
                        with no_sync:
                            chosen, rejected = score_pairs(ddp_scorer, micro, pad_id, info.device)
                            loss = bradley_terry_loss_sum(chosen, rejected, cfg.center_rewards_coef)
                            (loss * info.world_size / plan.batch_size).backward()
                            loss_sum += float(loss.detach())
                            correct += float((chosen > rejected).sum())
                    grad_norm = clip_gradients(model, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum, correct, n_tokens = distributed.all_reduce_sum(
                    [loss_sum, correct, n_tokens], info.device
                )
                job.end_step(
                    {
                        "loss": loss_sum / plan.batch_size,
                        "accuracy": correct / plan.batch_size,
                        "grad_norm": grad_norm,
                        "learning_rate": scheduler.get_last_lr()[0],
                    },
                    train_state=plan_state(plan, job.step + 1, len(train)),
                    tokens=int(n_tokens),
                    epoch=epoch,
                    evaluate=lambda: evaluate_pairs(scorer, evals, cfg, info, pad_id),
                )
            final = job.run_dir / "final"
            if not job.completed:
                job.finish()  # raises JobStopped (the checkpoint is written)
            with job.phase("eval"):
                responses = list({seq: None for pair in train for seq in map(tuple, pair)})
                mean, std = reward_statistics(
                    scorer, [list(r) for r in responses], cfg.eval_batch_size, info, pad_id
                )
            if info.is_main:
                tmp = final.with_name(final.name + ".tmp")
                if tmp.exists():
                    shutil.rmtree(tmp)
                save_reward_checkpoint(
                    model,
                    tokenizer,
                    tmp,
                    reward_mean=mean,
                    reward_std=std,
                    version=cfg.version or f"{job.job_id}-step{job.step}",
                    extra={
                        "base_model": str(resolve_model_path(cfg.model)),
                        "eval_accuracy": job.metrics.get("eval_accuracy"),
                        "eval_loss": job.metrics.get("eval_loss"),
                        "step": job.step,
                        "snapshot": cfg.snapshot or cfg.data_file or "",
                        "train_pairs": len(train),
                        "eval_pairs": len(evals),
                    },
                )
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                log.info("reward model saved to %s (reward mean %.4f, std %.4f)", final, mean, std)
            if info.enabled:
                torch.distributed.barrier()
            job.finish(final)
            return final
    finally:
        distributed.cleanup()
