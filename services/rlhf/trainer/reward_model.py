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

import contextlib
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.core.errors import FailedPrecondition
from rlhf.core.models import (
    common_prefix_length,
    init_reward_model_from_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
    resolve_model_path,
    reward_forward,
    score_head,
    set_torch_threads,
)
from rlhf.rl.rollout import MIN_SHARED_PREFIX
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

Pair = tuple[int, int]  # (chosen, rejected) as indices into the job's list of distinct sequences


def decoder_layers(model) -> tuple[torch.nn.Module, str]:
    """(module holding the transformer layers, attribute name): ``layers`` (Llama, Mistral, Qwen, ...) or
    ``h`` (GPT-2 style)."""
    base = model.base_model
    for name in ("layers", "h"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return base, name
    raise ValueError(f"trainable_layers: {type(model).__name__} has no list of transformer layers")


@contextlib.contextmanager
def only_layers(model, layers: list[torch.nn.Module]) -> Iterator[None]:
    """Run the model's backbone with ``layers`` in place of its full layer list (restored afterwards)."""
    base, name = decoder_layers(model)
    full = getattr(base, name)
    setattr(base, name, torch.nn.ModuleList(layers))
    try:
        yield
    finally:
        setattr(base, name, full)


def shared_prefix_groups(
    sequences: list[list[int]], min_prefix: int = MIN_SHARED_PREFIX, max_group: int = 256
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Sequences that start with the same tokens (the replies to one prompt), found without knowing the prompt
    format: ``(groups, singles)``, each group ``(prefix length, member indices)``.

    The sequences are sorted lexicographically, so sequences sharing a prefix are neighbours, and cut into
    runs of neighbours so that the tokens the groups save, ``(members - 1) * prefix length`` summed, is largest
    (dynamic programming over runs of at most ``max_group``). A group's prefix is at most its shortest member's
    length minus one, so every member keeps at least one token of its own; a prefix shorter than
    ``min_prefix`` makes no group, and those sequences are ``singles``.
    """
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    n = len(order)
    lcp = [common_prefix_length([sequences[order[k]], sequences[order[k + 1]]]) for k in range(n - 1)]
    best = [0] * (n + 1)  # best[j]: tokens saved over the first j sorted sequences
    start = list(range(n + 1))  # start[j]: where the last run of the best cut of the first j begins
    prefix = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], start[j] = best[j - 1], j - 1
        shared = len(sequences[order[j - 1]]) - 1
        for i in range(j - 2, max(-1, j - 1 - max_group), -1):  # the run order[i : j]
            shared = min(shared, lcp[i], len(sequences[order[i]]) - 1)
            if shared < min_prefix:
                break
            gain = best[i] + (j - 1 - i) * shared
            if gain > best[j]:
                best[j], start[j], prefix[j] = gain, i, shared
    groups: list[tuple[int, list[int]]] = []
    singles: list[int] = []
    j = n
    while j > 0:
        i = start[j]
        if j - i > 1:
            groups.append((prefix[j], order[i:j]))
        else:
            singles.append(order[i])
        j = i
    return groups[::-1], singles[::-1]


class FeaturePassStopped(Exception):
    """A stop was requested while the feature pass ran (before the first training step)."""


class FeatureCache:
    """The hidden states entering layer ``split`` (the output of the frozen lower part) of every sequence, one
    float tensor [len, hidden] per sequence.

    Sequences that share a prefix (:func:`shared_prefix_groups`: the replies to one prompt) run it once: the
    prefixes go through the lower layers in batches keeping their KV cache, then the suffixes run in batches
    on top of their prefixes' caches (each row's prefix cache left-padded to the batch's longest prefix and the
    padding masked out, the suffixes right-padded, positions continuing after the prefix). A sequence's
    features are its prefix's followed by its suffix's, the same hidden states a full pass computes. The other
    sequences run whole, in batches of similar length.
    """

    def __init__(
        self,
        model,
        split: int,
        sequences: list[list[int]],
        pad_id: int,
        batch_size: int,
        bar=None,
        should_stop=None,
    ):
        base, name = decoder_layers(model)
        layers = list(getattr(base, name))
        if not 0 < split < len(layers):
            raise ValueError(f"trainable_layers: must be below the model's {len(layers)} layers")
        self.split = split
        self.features: list[torch.Tensor | None] = [None] * len(sequences)
        self.sequences = sequences
        self.pad_id = pad_id
        self.batch_size = batch_size
        self._bar = bar
        self._should_stop = should_stop  # checked after every batch: FeaturePassStopped when it says so
        self._captured: list[torch.Tensor] = []

        def keep(_module, _args, output):
            self._captured.append(output[0] if isinstance(output, tuple) else output)

        groups, singles = shared_prefix_groups(sequences)
        hook = layers[split - 1].register_forward_hook(keep)
        try:
            self._device = next(model.parameters()).device
            with torch.no_grad(), only_layers(model, layers[:split]):
                self._run_whole(model.base_model, sorted(singles, key=lambda i: len(sequences[i])))
                groups.sort(key=lambda g: g[0])
                for chunk in chunks(groups, batch_size):
                    self._run_group_chunk(model.base_model, chunk)
        finally:
            hook.remove()
            self._captured.clear()
            self._bar = None

    def _lower(self, backbone, ids, mask, position_ids, cache=None) -> tuple[torch.Tensor, object]:
        """(hidden states entering layer ``split`` [B, T, hidden], the KV cache when one was passed)."""
        self._captured.clear()
        out = backbone(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=position_ids.to(self._device),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return self._captured[-1], out.past_key_values if cache is not None else None

    def _done(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)
        if self._should_stop is not None and self._should_stop():
            raise FeaturePassStopped

    def _run_whole(self, backbone, rows: list[int]) -> None:
        for batch in chunks(rows, self.batch_size):
            ids, mask = pad_right([self.sequences[i] for i in batch], self.pad_id)
            hidden, _ = self._lower(backbone, ids, mask, position_ids_from_mask(mask))
            for row, i in enumerate(batch):
                self.features[i] = hidden[row, : len(self.sequences[i])].clone()
            self._done(len(batch))

    def _run_group_chunk(self, backbone, groups: list[tuple[int, list[int]]]) -> None:
        from transformers import DynamicCache

        ids, mask = pad_right(
            [self.sequences[members[0]][:length] for length, members in groups], self.pad_id
        )
        # right padding: a prefix's keys and values do not see the padding after it
        prefix_hidden, prefix_cache = self._lower(
            backbone, ids, mask, position_ids_from_mask(mask), DynamicCache()
        )
        layer_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        # the suffixes of all groups of the chunk, in batches of similar suffix length (a batch holds suffixes
        # of several groups: fewer, larger forward passes than one batch per group)
        rows = [(g, i) for g, (_, members) in enumerate(groups) for i in members]
        rows.sort(key=lambda r: len(self.sequences[r[1]]) - groups[r[0]][0])
        for batch in chunks(rows, self.batch_size):
            lengths = [groups[g][0] for g, _ in batch]
            width = max(lengths)
            # each row's prefix cache, left-padded to the longest prefix of the batch (padding masked out)
            prefix_mask = torch.zeros((len(batch), width), dtype=torch.long)
            kv = [
                (
                    k.new_zeros((len(batch), k.shape[1], width, k.shape[3])),
                    v.new_zeros((len(batch), v.shape[1], width, v.shape[3])),
                )
                for k, v in layer_kv
            ]
            for row, (g, _) in enumerate(batch):
                length = lengths[row]
                prefix_mask[row, width - length :] = 1
                for (k, v), (pk, pv) in zip(layer_kv, kv, strict=True):
                    pk[row, :, width - length :] = k[g, :, :length]
                    pv[row, :, width - length :] = v[g, :, :length]
            ids, suffix_mask = pad_right(
                [self.sequences[i][lengths[row] :] for row, (_, i) in enumerate(batch)], self.pad_id
            )
            offsets = torch.tensor(lengths, dtype=torch.long)[:, None]
            hidden, _ = self._lower(
                backbone,
                ids,
                torch.cat([prefix_mask, suffix_mask], dim=1),
                offsets + position_ids_from_mask(suffix_mask),
                DynamicCache(kv),
            )
            for row, (g, i) in enumerate(batch):
                length = lengths[row]
                self.features[i] = torch.cat(
                    [prefix_hidden[g, :length], hidden[row, : len(self.sequences[i]) - length]]
                )
            self._done(len(batch))

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, T, hidden] right-padded with zeros, attention mask [B, T]) of ``rows``."""
        feats = [self.features[i] for i in rows]
        width = max(f.shape[0] for f in feats)
        out = feats[0].new_zeros((len(feats), width, feats[0].shape[-1]))
        mask = torch.zeros((len(feats), width), dtype=torch.long, device=out.device)
        for row, f in enumerate(feats):
            out[row, : f.shape[0]] = f
            mask[row, : f.shape[0]] = 1
        return out, mask


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


def freeze_lower_part(model, trainable_layers: int) -> int:
    """Freeze the embeddings and all but the top ``trainable_layers`` layers; returns the first trained layer."""
    base, name = decoder_layers(model)
    layers = getattr(base, name)
    if trainable_layers >= len(layers):
        raise ValueError(f"trainable_layers: must be below the model's {len(layers)} layers")
    split = len(layers) - trainable_layers
    for module in [model.get_input_embeddings(), *layers[:split]]:
        for p in module.parameters():
            p.requires_grad_(False)
    return split


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


def build_cache(
    model, split: int, sequences: list[list[int]], pad_id: int, cfg, info, should_stop=None
) -> FeatureCache:
    """The frozen lower part's output for every sequence, with a progress bar when the job shows one;
    raises FeaturePassStopped as soon as ``should_stop()`` is true."""
    from tqdm.auto import tqdm

    # like the job's own bar: rank 0 only; progress unset = only on a terminal (tqdm's disable=None)
    disable = True if not info.is_main else (None if cfg.progress is None else not cfg.progress)
    log.info("caching the frozen layers' output for %d sequences", len(sequences))
    with tqdm(
        total=len(sequences), desc="reward_model features", unit="seq", disable=disable, leave=False
    ) as bar:
        return FeatureCache(model, split, sequences, pad_id, cfg.eval_batch_size, bar, should_stop)


def run_reward_model(cfg: RewardModelConfig) -> Path:
    """Run (or resume) a reward-model job; returns the final reward checkpoint folder (a stopped job raises
    rlhf.trainer.job.JobStopped after writing its checkpoint)."""
    from rlhf.reward.checkpoint import save_reward_checkpoint

    set_torch_threads(cfg.torch_threads)
    info = distributed.setup(cfg.device)
    try:
        data = load_comparisons(cfg, cfg.rating_margin)
        tokenizer = load_tokenizer(cfg.model)
        sequences: list[list[int]] = []
        index: dict = {}
        train = encode_pairs(tokenizer, data.train, cfg.max_length, sequences, index)
        evals = encode_pairs(tokenizer, data.eval, cfg.max_length, sequences, index)
        groups = prompt_groups(data.train) if cfg.group_by_prompt else None
        plan = plan_steps(cfg, len(train), info.world_size)
        log.info(
            "reward model on %d train / %d eval pairs (%d distinct sequences): %d steps of %d",
            len(train),
            len(evals),
            len(sequences),
            plan.total_steps,
            plan.batch_size,
        )
        with TrainJob(cfg, kind="reward_model", total_steps=plan.total_steps) as job:
            model, tokenizer = init_reward_model_from_causal_lm(cfg.model)  # inside the job: seeded head
            model.to(info.device).train()
            split = freeze_lower_part(model, cfg.trainable_layers) if cfg.trainable_layers else 0
            head = list(score_head(model).parameters())
            head_ids = {id(p) for p in head}
            optimizer = make_optimizer(cfg, [p for p in model.parameters() if id(p) not in head_ids])
            optimizer.add_param_group(
                {"params": head, "weight_decay": 0.0, "lr": cfg.head_learning_rate or cfg.learning_rate}
            )
            scheduler = make_scheduler(cfg, optimizer, plan.total_steps)
            job.track("model", model, tokenizer=tokenizer)
            job.track("optimizer", optimizer)
            job.track("scheduler", scheduler)
            resumed = job.resume()
            check_resumed_plan(resumed, plan, len(train))
            if resumed and bool(resumed.get("group_by_prompt", False)) != cfg.group_by_prompt:
                raise FailedPrecondition(
                    f"group_by_prompt: the checkpoint was taken with group_by_prompt="
                    f"{bool(resumed.get('group_by_prompt', False))}; the data order would not continue"
                )
            pad_id = tokenizer.pad_token_id
            cache = None
            if split:
                # A stop (SIGTERM, Ctrl-C, the StopJob RPC) during this pass, which takes minutes on a CPU,
                # ends the job here rather than at the first step: no step has run since the start or the
                # resumed checkpoint, so nothing is lost. With several ranks the stop is agreed on at the
                # first step boundary as usual (one rank leaving alone would leave the others waiting).
                should_stop = (lambda: job.stop_requested) if not info.enabled else None
                try:
                    with job.phase("features"):
                        cache = build_cache(model, split, sequences, pad_id, cfg, info, should_stop)
                except FeaturePassStopped:
                    log.warning("stopped during the feature pass, before step %d", job.step + 1)
                    job.finish()  # raises JobStopped
            scorer = RewardScorer(model, sequences, pad_id, cache)
            if cache is not None:
                check_cache_exact(model, scorer, list(range(min(4, len(sequences)))))
            ddp_scorer = distributed.wrap(scorer, info)

            while not job.done:
                epoch, index = plan.position(job.step)
                global_batch = batch_indices(plan, job.step, len(train), cfg.seed, groups)
                mine = [train[i] for i in distributed.shard(global_batch, info.rank, info.world_size)]
                micro_batches = list(chunks(mine, cfg.micro_batch_size))
                loss_sum, correct = 0.0, 0.0
                n_tokens = sum(len(sequences[c]) + len(sequences[r]) for c, r in mine)
                with job.phase("update"):
                    for k, micro in enumerate(micro_batches):
                        sync = k == len(micro_batches) - 1
                        no_sync = (
                            ddp_scorer.no_sync() if info.enabled and not sync else contextlib.nullcontext()
                        )
                        with no_sync:
                            chosen, rejected = score_pairs(ddp_scorer, micro)
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
                    train_state={
                        **plan_state(plan, job.step + 1, len(train)),
                        "group_by_prompt": cfg.group_by_prompt,
                    },
                    tokens=int(n_tokens),
                    epoch=epoch,
                    evaluate=lambda: evaluate_pairs(scorer, evals, cfg, info),
                )
            final = job.run_dir / "final"
            if not job.completed:
                job.finish()  # raises JobStopped (the checkpoint is written)
            with job.phase("eval"):
                responses = sorted({row for pair in train for row in pair})
                mean, std = reward_statistics(scorer, responses, cfg.eval_batch_size, info)
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
                        "trainable_layers": cfg.trainable_layers,
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
