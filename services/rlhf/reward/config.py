"""Configuration of the reward scoring service (section ``reward``, env prefix ``RLHF_REWARD_``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from rlhf.core.config import ServerConfig, metrics_port_field, port_field
from rlhf.core.files import under_roots


class RewardConfig(ServerConfig):
    """The reward scoring server: the checkpoint, micro-batching, limits and the truncation policy."""

    section: ClassVar[str] = "reward"

    port: int = port_field(50052)
    metrics_port: int = metrics_port_field(9092)
    model: str | None = Field(
        None,
        description="Reward-model checkpoint folder (HF sequence classifier with one label, tokenizer, "
        "rlhf_reward.json), as written by `rlhf train reward-model`. Unset: serve no model until a LoadModel call.",
    )
    version: str | None = Field(
        None,
        description="Version to report for the startup model (default: rlhf_reward.json's, else folder name + hash).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Torch dtype of the weights."
    )
    device: str = Field(
        "auto",
        description="Torch device for the model: 'auto' (cuda when available, else cpu), 'cpu', 'cuda:0'...",
    )
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Most pairs in one forward pass (1 = one forward per pair)."
    )
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="Most tokens (rows x longest row, padding included) in one forward pass; longer batches are split.",
    )
    shared_prefix_min_tokens: int = Field(
        16,
        ge=0,
        description="When every row of a batch starts with at least this many identical tokens (the chat "
        "template's system turn, one prompt with several responses), run them once and reuse their key/value "
        "cache (0 = off).",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=10000,
        description="How long the first pair of a batch waits for others before the forward pass starts.",
    )
    max_queue: int = Field(
        4096, ge=1, description="Most pairs waiting to be scored; more are answered RESOURCE_EXHAUSTED."
    )
    max_pairs_per_request: int = Field(256, ge=1, description="Most items in one Score request.")
    max_tokens: int = Field(
        2048,
        ge=2,
        description="Longest scored sequence (prompt + response + EOS) in tokens; capped by the model's context.",
    )
    max_text_chars: int = Field(
        32768, ge=1, description="Longest accepted prompt, response or chat message, in characters."
    )
    truncation: Literal["reject", "truncate_left"] = Field(
        "reject",
        description="Default for pairs over max_tokens: 'reject' (INVALID_ARGUMENT) or 'truncate_left' "
        "(drop prompt tokens from the left; the response is never cut). A request may override it.",
    )
    padding_side: Literal["right", "left"] = Field(
        "right", description="Where batches are padded (scores do not depend on it)."
    )
    allow_load_model: bool = Field(True, description="Accept LoadModel (hot swap) calls.")
    model_roots: list[str] = Field(
        [],
        description="When set, LoadModel only accepts checkpoint folders under one of these directories.",
    )

    def path_allowed(self, path: str | Path) -> bool:
        return under_roots(path, self.model_roots)
