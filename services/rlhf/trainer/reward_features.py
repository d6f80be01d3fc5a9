"""The frozen lower part of a reward model, run once per distinct sequence and cached (``trainable_layers``).

With ``trainable_layers = N > 0`` only the top N transformer layers, the final norm and the score head are
trained. The frozen lower part (embeddings and the other layers) is a fixed function of the tokens, so its
output is computed once per distinct sequence before the first step and kept in memory
(:class:`FeatureCache`, which runs a prefix that several sequences share, such as the prompt of several
replies, only once); every step then runs the top N layers only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from rlhf.core.models import common_prefix_length, position_ids_from_mask
from rlhf.rl.rollout import MIN_SHARED_PREFIX
from rlhf.trainer.data import pad_right
from rlhf.trainer.loop import chunks

log = logging.getLogger("rlhf.trainer.reward_model")


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


def build_cache(
    model, split: int, sequences: list[list[int]], pad_id: int, cfg, info, should_stop=None
) -> FeatureCache:
    """The frozen lower part's output for every sequence, with a progress bar when the job shows one;
    raises FeaturePassStopped as soon as ``should_stop()`` is true."""
    # like the job's own bar: rank 0 only; progress unset = only on a terminal (tqdm's disable=None)
    disable = True if not info.is_main else (None if cfg.progress is None else not cfg.progress)
    log.info("caching the frozen layers' output for %d sequences", len(sequences))
    with tqdm(
        total=len(sequences), desc="reward_model features", unit="seq", disable=disable, leave=False
    ) as bar:
        return FeatureCache(model, split, sequences, pad_id, cfg.eval_batch_size, bar, should_stop)
