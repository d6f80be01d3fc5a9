"""The engine's KV-cache surgery (transformers ``DynamicCache``, tensors ``(batch, heads, seq_len, head_dim)``).

Continuous batching merges the newcomers' prefilled cache into the running batch's: the shorter one is left-padded
with masked zeros, rows are appended, and columns that only padding uses any more are cut.
"""

from __future__ import annotations

import torch


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _cache_layers(cache) -> list:
    return list(cache.layers)


def pad_cache_left(cache, extra: int) -> None:
    if extra <= 0:
        return
    for layer in _cache_layers(cache):
        k, v = layer.keys, layer.values
        pad_k = k.new_zeros((*k.shape[:2], extra, k.shape[3]))
        pad_v = v.new_zeros((*v.shape[:2], extra, v.shape[3]))
        layer.keys = torch.cat([pad_k, k], dim=2)
        layer.values = torch.cat([pad_v, v], dim=2)


def concat_caches(a, b) -> None:
    """Append the rows of cache ``b`` to cache ``a`` (same sequence length)."""
    for la, lb in zip(_cache_layers(a), _cache_layers(b), strict=True):
        la.keys = torch.cat([la.keys, lb.keys], dim=0)
        la.values = torch.cat([la.values, lb.values], dim=0)


def trim_cache_left(cache, start: int) -> None:
    for layer in _cache_layers(cache):
        layer.keys = layer.keys[:, :, start:, :]
        layer.values = layer.values[:, :, start:, :]
