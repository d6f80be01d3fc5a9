"""A tiny causal LM and a helper that packs token lists into a Rollout."""

from __future__ import annotations

import pytest

from rlhf.core.models import load_causal_lm, load_tokenizer
from rlhf.rl.rollout import build_rollout


@pytest.fixture(scope="module")
def tiny(tiny_lm_path):
    return load_causal_lm(tiny_lm_path), load_tokenizer(tiny_lm_path)


def _rollout(tokenizer, prompts_ids, responses, logprobs=None, eos=None, share_prefix=True):
    logprobs = logprobs or [[-1.0] * len(r) for r in responses]
    eos = eos if eos is not None else [r[-1] == tokenizer.eos_token_id for r in responses]
    return build_rollout(
        [f"p{i}" for i in range(len(responses))],
        prompts_ids,
        responses,
        logprobs,
        eos,
        ["x"] * len(responses),
        pad_token_id=tokenizer.pad_token_id,
        policy_version=3,
        share_prefix=share_prefix,
    )


@pytest.fixture
def make_rollout():
    """make_rollout(tokenizer, prompt ids, response ids, logprobs=None, eos=None, share_prefix=True)."""
    return _rollout
