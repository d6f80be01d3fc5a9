"""Fixtures every test folder shares: tiny random models (built once per session, never downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        from rlhf.core.models import set_torch_threads
    except ImportError:  # torch not installed: only the tests that do not need it run
        return
    set_torch_threads(int(os.environ.get("RLHF_TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory):
    """A tiny random Llama causal LM with a ChatML tokenizer, saved as an HF folder."""
    from rlhf.core.models import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_rm_path(tmp_path_factory):
    """A tiny random Llama reward model (one-label sequence classifier) with the same tokenizer."""
    from rlhf.core.models import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))
