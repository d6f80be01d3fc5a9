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

import hashlib
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


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample, mixed from (request seed, prompt index, sample index): every prompt and every
    sample of a request draws its own random numbers, and the same request draws the same ones again."""
    digest = hashlib.blake2b(f"{int(seed)}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def row_generator(seed: int | None, sample_index: int, prompt_index: int = 0) -> torch.Generator | None:
    """The generator of one sample: seeded by ``sample_seed``, or a fresh random seed."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(sample_seed(seed, prompt_index, sample_index))
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
    """Sample one token per row of ``logits`` (batch, vocab); returns (token ids, logprobs) per row.

    Sampled rows draw by inverse CDF: one uniform number from the row's own generator, searched in the
    cumulative distribution (batched over rows; much cheaper than one ``torch.multinomial`` per row on a large
    vocabulary, with the same distribution).
    """
    logits = logits.float()
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], dtype=torch.float32)
    logp_temp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens: list[int] = [0] * len(params)
    logprobs: list[float] = [0.0] * len(params)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    truncated: dict[int, torch.Tensor] = {}
    for i, p in enumerate(params):
        if p.greedy:
            tokens[i] = int(torch.argmax(logits[i]))
            logprobs[i] = float(logp_temp[i, tokens[i]])  # temperature 0 counts as 1 for both modes
        elif p.truncated:
            truncated[i] = torch.log_softmax(truncate_logits(logits[i] / temps[i], p.top_k, p.top_p), dim=-1)
    if sampled:
        rows = torch.tensor(sampled)
        logp = logp_temp[rows]
        for k, i in enumerate(sampled):
            if i in truncated:
                logp[k] = truncated[i]
        cdf = logp.exp().cumsum(-1)
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]) * cdf[:, -1]
        drawn = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp(max=logits.shape[-1] - 1)
        for k, i in enumerate(sampled):
            tok = int(drawn[k])
            tokens[i] = tok
            use_truncated = i in truncated and params[i].logprobs_mode == MODE_SAMPLING
            logprobs[i] = float(truncated[i][tok]) if use_truncated else float(logp_temp[i, tok])
    return tokens, logprobs
