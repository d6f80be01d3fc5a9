"""``rlhf train reward-model``: a scalar reward model on preference pairs, Bradley–Terry loss.

The model starts from a causal LM (usually the SFT model) with its LM head replaced by a zero-mean scalar
head (rlhf.core.models.init_reward_model_from_causal_lm). A pair is scored as the reward service scores it:
prompt + response + EOS with the chat template (rlhf.core.chat), the score read at the last real token
(rlhf.core.models.reward_forward). Loss per pair: ``-log sigmoid(r_chosen - r_rejected)`` (plus an optional
``center_rewards_coef * (r_chosen + r_rejected)^2``), averaged over the global batch. Held-out accuracy is
the share of eval pairs with ``r_chosen > r_rejected``.

With ``trainable_layers = N > 0`` only the top N transformer layers, the final norm and the score head are
trained. The frozen lower part (embeddings and the other layers) is a fixed function of the tokens, so its
output is computed once per distinct sequence before the first step and kept in memory
(:class:`FeatureCache`, which runs a prefix that several sequences share, such as the prompt of several
replies, only once); every step then runs the top N layers only. This is exact, not an approximation:
before training, the cached path is checked against the full model on a few sequences. The checkpoint is the
whole model as usual.

The final checkpoint (``run_dir/final``) is written with rlhf.reward.checkpoint.save_reward_checkpoint and
carries the mean and standard deviation of the final model's scores over the training responses, which the
reward service uses for normalized scores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.core.errors import FailedPrecondition
from rlhf.core.files import atomic_folder
from rlhf.core.models import (
    init_reward_model_from_causal_lm,
    load_tokenizer,
    resolve_model_path,
    reward_forward,
    score_head,
    set_torch_threads,
)
from rlhf.reward.checkpoint import save_reward_checkpoint
from rlhf.rl.optim import make_scheduler
from rlhf.trainer import distributed
from rlhf.trainer.config import RewardModelConfig
from rlhf.trainer.data import (
    encode_scored_text,
    load_comparisons,
    pad_right,
    prompt_key,
)
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
from rlhf.trainer.reward_features import (
    FeaturePassStopped,
    build_cache,
    decoder_layers,
    freeze_lower_part,
    only_layers,
)

log = logging.getLogger("rlhf.trainer.reward_model")

Pair = tuple[int, int]  # (chosen, rejected) as indices into the job's list of distinct sequences


class RewardScorer(torch.nn.Module):
    """Scores of sequences given by index (a module, so that DistributedDataParallel sees the forward pass).

    Without a cache: reward_forward on the padded token ids. With a :class:`FeatureCache`: the top layers
    (``split`` onwards), final norm and head applied to the cached hidden states.
    """

    def __init__(self, model: torch.nn.Module, sequences: list[list[int]], pad_id: int, cache=None):
        super().__init__()
        self.model = model
        self.sequences = sequences
        self.pad_id = pad_id
        self.cache = cache

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        rows = [int(r) for r in rows]
        device = next(self.model.parameters()).device
        if self.cache is None:
            ids, mask = pad_right([self.sequences[i] for i in rows], self.pad_id)
            return reward_forward(self.model, ids.to(device), mask.to(device))
        features, mask = self.cache.batch(rows)
        base, name = decoder_layers(self.model)
        upper = list(getattr(base, name))[self.cache.split :]
        with only_layers(self.model, upper):
            return reward_forward(self.model, None, mask.to(device), inputs_embeds=features.to(device))


def encode_pairs(
    tokenizer, comparisons, max_length: int, sequences: list[list[int]], index: dict
) -> list[Pair]:
    """Pairs as indices into ``sequences`` (appended to; ``index`` maps a sequence to its position)."""

    def position(prompt, response) -> int:
        seq = tuple(encode_scored_text(tokenizer, prompt, response, max_length))
        if seq not in index:
            index[seq] = len(sequences)
            sequences.append(list(seq))
        return index[seq]

    return [(position(c.prompt, c.chosen), position(c.prompt, c.rejected)) for c in comparisons]


def score_pairs(scorer, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) in one forward pass over the distinct sequences of the pairs (a sequence
    in several pairs is scored once; its gradient collects the contributions of all of them)."""
    rows = torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs], dtype=torch.long)
    distinct, inverse = torch.unique(rows, return_inverse=True)
    rewards = scorer(distinct)[inverse]
    return rewards[: len(pairs)], rewards[len(pairs) :]


def prompt_groups(comparisons) -> list[int]:
    """A prompt id per comparison (equal prompts, equal ids; numbered in order of first appearance)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(prompt_key(c.prompt), len(ids)) for c in comparisons]


def check_cache_exact(model, scorer: RewardScorer, rows: list[int], tolerance: float = 1e-3) -> float:
    """Largest difference between the cached path and the full model on ``rows``; raises if above
    ``tolerance`` (an architecture whose upper layers cannot run from hidden states passed as embeddings)."""
    with torch.no_grad():
        cached = scorer(torch.tensor(rows))
        ids, mask = pad_right([scorer.sequences[i] for i in rows], scorer.pad_id)
        device = next(model.parameters()).device
        full = reward_forward(model, ids.to(device), mask.to(device))
    gap = float((cached - full).abs().max())
    scale = max(1.0, float(full.abs().max()))
    if not gap <= tolerance * scale:
        raise ValueError(
            f"trainable_layers: {type(model).__name__} does not reproduce its scores from cached hidden states "
            f"(difference {gap:.3g}); use trainable_layers=0"
        )
    return gap


def bradley_terry_loss_sum(
    chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0
) -> torch.Tensor:
    """Sum over pairs of -log sigmoid(r_chosen - r_rejected) (+ center_coef * (r_chosen + r_rejected)^2)."""
    loss = -F.logsigmoid(chosen - rejected)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss.sum()


@torch.no_grad()
def evaluate_pairs(scorer, pairs: list[Pair], cfg: RewardModelConfig, info) -> dict:
    """eval_loss (mean Bradley–Terry loss), eval_accuracy and eval_margin over ``pairs`` (sharded)."""
    if not pairs:
        return {}
    was_training = scorer.training
    scorer.eval()
    loss, correct, margin, count = 0.0, 0.0, 0.0, 0
    for batch in chunks(distributed.shard(pairs, info.rank, info.world_size), cfg.eval_batch_size):
        chosen, rejected = score_pairs(scorer, batch)
        loss += float(bradley_terry_loss_sum(chosen, rejected))
        correct += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        count += len(batch)
    loss, correct, margin, count = distributed.all_reduce_sum([loss, correct, margin, count], info.device)
    scorer.train(was_training)
    return {"eval_loss": loss / count, "eval_accuracy": correct / count, "eval_margin": margin / count}


@torch.no_grad()
def reward_statistics(scorer, rows: list[int], batch_size: int, info) -> tuple[float, float]:
    """(mean, std) of the scores of the sequences ``rows`` (sharded over ranks)."""
    scorer.eval()
    total, total_sq, count = 0.0, 0.0, 0
    for batch in chunks(distributed.shard(rows, info.rank, info.world_size), batch_size):
        scores = scorer(torch.tensor(batch, dtype=torch.long)).double()
        total += float(scores.sum())
        total_sq += float((scores**2).sum())
        count += len(batch)
    total, total_sq, count = distributed.all_reduce_sum([total, total_sq, count], info.device)
    mean = total / max(count, 1)
    var = max(0.0, total_sq / max(count, 1) - mean**2)
    return mean, math.sqrt(var)


@dataclass
class PairData:
    """The job's comparisons as pairs of indices into its distinct token sequences."""

    train: list[Pair]
    evals: list[Pair]
    sequences: list[list[int]]
    groups: list[int] | None  # a prompt id per train pair (group_by_prompt)


def encode_data(cfg: RewardModelConfig, tokenizer) -> PairData:
    """Load the comparisons and tokenize each distinct (prompt, response) once."""
    data = load_comparisons(cfg, cfg.rating_margin)
    sequences: list[list[int]] = []
    index: dict = {}
    train = encode_pairs(tokenizer, data.train, cfg.max_length, sequences, index)
    evals = encode_pairs(tokenizer, data.eval, cfg.max_length, sequences, index)
    groups = prompt_groups(data.train) if cfg.group_by_prompt else None
    return PairData(train, evals, sequences, groups)


def make_optimizer_and_scheduler(cfg: RewardModelConfig, model, total_steps: int):
    """AdamW on the trainable parameters (the score head in its own group, no decay) and the LR schedule."""
    head = list(score_head(model).parameters())
    head_ids = {id(p) for p in head}
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if id(p) not in head_ids])
    optimizer.add_param_group(
        {"params": head, "weight_decay": 0.0, "lr": cfg.head_learning_rate or cfg.learning_rate}
    )
    return optimizer, make_scheduler(optimizer, total_steps, cfg.lr_scheduler, cfg.warmup_steps)


def check_resumed_order(resumed: dict, cfg: RewardModelConfig) -> None:
    """A resumed run continues the data order only with the checkpoint's group_by_prompt."""
    if resumed and bool(resumed.get("group_by_prompt", False)) != cfg.group_by_prompt:
        raise FailedPrecondition(
            f"group_by_prompt: the checkpoint was taken with group_by_prompt="
            f"{bool(resumed.get('group_by_prompt', False))}; the data order would not continue"
        )


def make_scorer(job: TrainJob, model, split: int, data: PairData, pad_id: int, cfg, info) -> RewardScorer:
    """The scorer, on cached features of the frozen lower part when ``split`` > 0 (checked exact)."""
    cache = None
    if split:
        # A stop (SIGTERM, Ctrl-C, the StopJob RPC) during this pass, which takes minutes on a CPU,
        # ends the job here rather than at the first step: no step has run since the start or the
        # resumed checkpoint, so nothing is lost. With several ranks the stop is agreed on at the
        # first step boundary as usual (one rank leaving alone would leave the others waiting).
        should_stop = (lambda: job.stop_requested) if not info.enabled else None
        try:
            with job.phase("features"):
                cache = build_cache(model, split, data.sequences, pad_id, cfg, info, should_stop)
        except FeaturePassStopped:
            log.warning("stopped during the feature pass, before step %d", job.step + 1)
            job.finish()  # raises JobStopped
    scorer = RewardScorer(model, data.sequences, pad_id, cache)
    if cache is not None:
        check_cache_exact(model, scorer, list(range(min(4, len(data.sequences)))))
    return scorer


@dataclass
class Training:
    """What an optimizer step updates: the model (through its scorer, DDP-wrapped under torchrun)."""

    model: torch.nn.Module
    scorer: RewardScorer
    ddp_scorer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def train_step(job: TrainJob, plan, data: PairData, training: Training, cfg, info) -> None:
    """One optimizer step on the global batch of ``job.step`` (this rank's shard in micro-batches)."""
    epoch, _ = plan.position(job.step)
    global_batch = batch_indices(plan, job.step, len(data.train), cfg.seed, data.groups)
    mine = [data.train[i] for i in distributed.shard(global_batch, info.rank, info.world_size)]
    micro_batches = list(chunks(mine, cfg.micro_batch_size))
    loss_sum, correct = 0.0, 0.0
    n_tokens = sum(len(data.sequences[c]) + len(data.sequences[r]) for c, r in mine)
    with job.phase("update"):
        for micro in accumulating(training.ddp_scorer, micro_batches, info.enabled):
            chosen, rejected = score_pairs(training.ddp_scorer, micro)
            loss = bradley_terry_loss_sum(chosen, rejected, cfg.center_rewards_coef)
            (loss * info.world_size / plan.batch_size).backward()
            loss_sum += float(loss.detach())
            correct += float((chosen > rejected).sum())
        grad_norm = optimizer_step(training.model, training.optimizer, training.scheduler, cfg.max_grad_norm)
    loss_sum, correct, n_tokens = distributed.all_reduce_sum([loss_sum, correct, n_tokens], info.device)
    job.end_step(
        {
            "loss": loss_sum / plan.batch_size,
            "accuracy": correct / plan.batch_size,
            "grad_norm": grad_norm,
            "learning_rate": training.scheduler.get_last_lr()[0],
        },
        train_state={
            **plan_state(plan, job.step + 1, len(data.train)),
            "group_by_prompt": cfg.group_by_prompt,
        },
        tokens=int(n_tokens),
        epoch=epoch,
        evaluate=lambda: evaluate_pairs(training.scorer, data.evals, cfg, info),
    )


def save_final(job: TrainJob, model, tokenizer, scorer, data: PairData, cfg, info) -> Path:
    """RUN_DIR/final: the reward checkpoint with the mean/std of its scores over the training responses."""
    final = job.run_dir / "final"
    with job.phase("eval"):
        responses = sorted({row for pair in data.train for row in pair})
        mean, std = reward_statistics(scorer, responses, cfg.eval_batch_size, info)
    if info.is_main:
        with atomic_folder(final) as tmp:
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
                    "train_pairs": len(data.train),
                    "trainable_layers": cfg.trainable_layers,
                    "eval_pairs": len(data.evals),
                },
            )
        log.info("reward model saved to %s (reward mean %.4f, std %.4f)", final, mean, std)
    if info.enabled:
        torch.distributed.barrier()
    return final


def run_reward_model(cfg: RewardModelConfig) -> Path:
    """Run (or resume) a reward-model job; returns the final reward checkpoint folder (a stopped job raises
    rlhf.trainer.job.JobStopped after writing its checkpoint)."""
    set_torch_threads(cfg.torch_threads)
    info = distributed.setup(cfg.device)
    try:
        data = encode_data(cfg, load_tokenizer(cfg.model))
        plan = plan_steps(cfg, len(data.train), info.world_size)
        log.info(
            "reward model on %d train / %d eval pairs (%d distinct sequences): %d steps of %d",
            len(data.train),
            len(data.evals),
            len(data.sequences),
            plan.total_steps,
            plan.batch_size,
        )
        with TrainJob(
            cfg, kind="reward_model", total_steps=plan.total_steps, eval_every=cfg.eval_every
        ) as job:
            model, tokenizer = init_reward_model_from_causal_lm(cfg.model)  # inside the job: seeded head
            model.to(info.device).train()
            split = freeze_lower_part(model, cfg.trainable_layers) if cfg.trainable_layers else 0
            optimizer, scheduler = make_optimizer_and_scheduler(cfg, model, plan.total_steps)
            job.track("model", model, tokenizer=tokenizer)
            job.track("optimizer", optimizer)
            job.track("scheduler", scheduler)
            resumed = job.resume()
            check_resumed_plan(resumed, plan, len(data.train))
            check_resumed_order(resumed, cfg)
            scorer = make_scorer(job, model, split, data, tokenizer.pad_token_id, cfg, info)
            training = Training(model, scorer, distributed.wrap(scorer, info), optimizer, scheduler)
            while not job.done:
                train_step(job, plan, data, training, cfg, info)
            if not job.completed:
                job.finish()  # raises JobStopped (the checkpoint is written)
            final = save_final(job, model, tokenizer, scorer, data, cfg, info)
            job.finish(final)
            return final
    finally:
        distributed.cleanup()
