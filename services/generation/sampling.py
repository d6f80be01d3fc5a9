"""Per-row sampling with logprobs: pure functions on tensors, shared by the engine and its tests.

Order of the transformations (as Hugging Face ``generate`` applies them): logits / temperature, then top-k,
then top-p (nucleus, renormalized). Temperature 0 means greedy (argmax of the raw logits).

Logprobs (see ``LogprobsMode`` in protos/rlhf/v1/policy.proto):
- TEMPERATURE: ``log_softmax(logits / temperature)[token]`` without top-k/top-p truncation; temperature 0 counts
  as 1. This is what a PPO trainer recomputes from the policy with a teacher-forced forward pass.
- SAMPLING: log-probability under the exact (truncated, renormalized) distribution the token was drawn from;
  for greedy decoding, ``log_softmax(logits)[token]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODE_SAMPLING = "sampling"
MODE_TEMPERATURE = "temperature"


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling parameters of one request (all its rows share them)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs_mode: str = MODE_TEMPERATURE

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def row_generator(seed: int | None, sample_index: int) -> torch.Generator | None:
    """The generator of one sample: seeded from (seed, sample_index), or a fresh random seed."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed((int(seed) + 1_000_003 * sample_index) % (2**63))
    return g


def truncate_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p filtering of one row of (temperature-scaled) logits: removed entries become -inf."""
    out = scaled
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        # Hugging Face's TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep at least one.
        sorted_logits, sorted_idx = torch.sort(out, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[-1] = False
        remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[float]]:
    """Sample one token per row of ``logits`` (batch, vocab); returns (token ids, logprobs) per row."""
    logits = logits.float()
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], dtype=torch.float32)
    logp_temp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens: list[int] = []
    logprobs: list[float] = []
    for i, p in enumerate(params):
        if p.greedy:
            tok = int(torch.argmax(logits[i]))
            lp = float(logp_temp[i, tok])  # temperature 0 counts as 1 for both modes
        elif not p.truncated:
            tok = int(torch.multinomial(logp_temp[i].exp(), 1, generator=generators[i]))
            lp = float(logp_temp[i, tok])
        else:
            filtered = truncate_logits(logits[i] / temps[i], p.top_k, p.top_p)
            logp_trunc = torch.log_softmax(filtered, dim=-1)
            tok = int(torch.multinomial(logp_trunc.exp(), 1, generator=generators[i]))
            lp = float(logp_trunc[tok]) if p.logprobs_mode == MODE_SAMPLING else float(logp_temp[i, tok])
        tokens.append(tok)
        logprobs.append(lp)
    return tokens, logprobs
