"""``rlhf train sft``: supervised fine-tuning of a causal LM on demonstrations.

Each demonstration is formatted with the chat template exactly as generation sees it
(rlhf.core.chat.tokenize_prompt_response: the rendered prompt, then the response and its EOS) and the
cross-entropy is taken on the response tokens only, averaged over all response tokens of the global batch.
The eval loss is the same average over the eval split. The final model is an HF folder (``run_dir/final``)
that the generation service loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.core.files import atomic_folder
from rlhf.core.models import causal_lm_logits, load_causal_lm, load_tokenizer, set_torch_threads
from rlhf.rl.optim import make_scheduler
from rlhf.trainer import distributed
from rlhf.trainer.config import SFTConfig
from rlhf.trainer.data import encode_sft_example, load_demonstrations, pad_right
from rlhf.trainer.job import TrainJob
from rlhf.trainer.loop import (
    accumulating,
    batch_indices,
    check_resumed_plan,
    chunks,
    make_optimizer,
    optimizer_step,
    plan_state,
    plan_steps,
)

log = logging.getLogger("rlhf.trainer.sft")

Example = tuple[list[int], list[int]]  # (input ids, labels with -100 on the prompt)


def encode_all(tokenizer, demos, max_length: int) -> list[Example]:
    out = []
    for demo in demos:
        example = encode_sft_example(tokenizer, demo, max_length)
        if example is not None:
            out.append(example)
    if len(out) < len(demos):
        log.warning("%d demonstrations skipped: prompt longer than max_length", len(demos) - len(out))
    return out


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_right([e[0] for e in examples], pad_id)
    labels, _ = pad_right([e[1] for e in examples], -100)
    return ids, mask, labels


def response_loss_sum(model, ids, mask, labels) -> torch.Tensor:
    """Sum of the next-token cross-entropy over response tokens (labels != -100)."""
    logits = causal_lm_logits(model, ids, mask)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def _num_targets(examples: list[Example]) -> int:
    return sum(sum(1 for t in labels[1:] if t != -100) for _, labels in examples)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], cfg: SFTConfig, info, pad_id: int) -> float | None:
    """Mean response-token loss over ``examples`` (sharded over ranks)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in chunks(distributed.shard(examples, info.rank, info.world_size), cfg.eval_batch_size):
        ids, mask, labels = (t.to(info.device) for t in collate(batch, pad_id))
        total += float(response_loss_sum(model, ids, mask, labels))
        count += _num_targets(batch)
    total, count = distributed.all_reduce_sum([total, count], info.device)
    model.train(was_training)
    return total / max(count, 1)


def save_final(model, tokenizer, folder: Path) -> Path:
    """The model as an HF folder, written atomically: a reader never sees a half-written model."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


@dataclass
class Training:
    """What an optimizer step updates: the model (DDP-wrapped under torchrun), its optimizer and schedule."""

    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pad_id: int


def train_step(job: TrainJob, plan, train: list, training: Training, cfg: SFTConfig, info, evaluate) -> None:
    """One optimizer step on the global batch of ``job.step`` (this rank's shard in micro-batches)."""
    epoch, _ = plan.position(job.step)
    global_batch = batch_indices(plan, job.step, len(train), cfg.seed)
    mine = [train[i] for i in distributed.shard(global_batch, info.rank, info.world_size)]
    n_targets, n_tokens = distributed.all_reduce_sum(
        [_num_targets(mine), sum(len(ids) for ids, _ in mine)], info.device
    )
    loss_sum = 0.0
    with job.phase("update"):
        for micro in accumulating(training.ddp_model, list(chunks(mine, cfg.micro_batch_size)), info.enabled):
            ids, mask, labels = (t.to(info.device) for t in collate(micro, training.pad_id))
            loss = response_loss_sum(training.ddp_model, ids, mask, labels)
            # sum / global count x world: DDP's gradient mean then equals the global-batch mean
            (loss * info.world_size / max(n_targets, 1)).backward()
            loss_sum += float(loss.detach())
        grad_norm = optimizer_step(training.model, training.optimizer, training.scheduler, cfg.max_grad_norm)
    (total_loss,) = distributed.all_reduce_sum([loss_sum], info.device)
    job.end_step(
        {
            "loss": total_loss / max(n_targets, 1),
            "grad_norm": grad_norm,
            "learning_rate": training.scheduler.get_last_lr()[0],
        },
        train_state=plan_state(plan, job.step + 1, len(train)),
        tokens=int(n_tokens),
        epoch=epoch,
        evaluate=evaluate,
    )


def run_sft(cfg: SFTConfig) -> Path:
    """Run (or resume) an SFT job; returns the final HF folder. A job stopped by SIGTERM, Ctrl-C or the Stop
    RPC raises rlhf.trainer.job.JobStopped after writing its checkpoint."""
    set_torch_threads(cfg.torch_threads)
    info = distributed.setup(cfg.device)
    try:
        tokenizer = load_tokenizer(cfg.model)
        data = load_demonstrations(cfg)
        train = encode_all(tokenizer, data.train, cfg.max_length)
        evals = encode_all(tokenizer, data.eval, cfg.max_length)
        plan = plan_steps(cfg, len(train), info.world_size)
        log.info(
            "SFT on %d train / %d eval demonstrations: %d steps of %d (%d per epoch)",
            len(train),
            len(evals),
            plan.total_steps,
            plan.batch_size,
            plan.steps_per_epoch,
        )
        with TrainJob(cfg, kind="sft", total_steps=plan.total_steps, eval_every=cfg.eval_every) as job:
            model = load_causal_lm(cfg.model).to(info.device)
            model.train()
            ddp_model = distributed.wrap(model, info)
            optimizer = make_optimizer(cfg, model.parameters())
            scheduler = make_scheduler(optimizer, plan.total_steps, cfg.lr_scheduler, cfg.warmup_steps)
            job.track("model", model, tokenizer=tokenizer)
            job.track("optimizer", optimizer)
            job.track("scheduler", scheduler)
            check_resumed_plan(job.resume(), plan, len(train))
            pad_id = tokenizer.pad_token_id

            def evaluate() -> dict:
                loss = evaluate_loss(model, evals, cfg, info, pad_id)
                return {} if loss is None else {"eval_loss": loss}

            while not job.done:
                train_step(
                    job,
                    plan,
                    train,
                    Training(model, ddp_model, optimizer, scheduler, pad_id),
                    cfg,
                    info,
                    evaluate,
                )
            final = job.run_dir / "final"
            if job.completed:
                if info.is_main:
                    save_final(model, tokenizer, final)
                    log.info("SFT model saved to %s", final)
                if info.enabled:
                    torch.distributed.barrier()
            job.finish(final)  # stopped before the last step: raises JobStopped (after its checkpoint)
            return final
    finally:
        distributed.cleanup()
