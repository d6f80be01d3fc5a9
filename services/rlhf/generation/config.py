"""Configuration of the policy generation service (section ``generation``, env prefix ``RLHF_GENERATION_``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from rlhf.core.config import ServerConfig, metrics_port_field, port_field


class GenerationConfig(ServerConfig):
    """The policy generation server: model, backend, batching and limits."""

    section: ClassVar[str] = "generation"

    port: int = port_field(50051)
    metrics_port: int = metrics_port_field(9091)
    model: str = Field(
        "default",
        description="Hugging Face causal LM folder, or 'default' for the built-in SmolLM2-135M-Instruct "
        "(with the tgi backend: the folder whose tokenizer renders prompts).",
    )
    backend: Literal["torch", "tgi"] = Field(
        "torch", description="'torch' (local transformers, weight updates) or 'tgi' (a TGI server)."
    )
    tgi_url: str | None = Field(None, description="Base URL of the Text Generation Inference server (tgi).")
    tgi_timeout_seconds: float = Field(120.0, gt=0, description="HTTP timeout of one TGI call.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Torch dtype of the served weights."
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Most sequences decoded together; also the most prompts x n accepted in one request.",
    )
    max_queue: int = Field(
        256, ge=0, description="Most sequences waiting to join the batch; more are RESOURCE_EXHAUSTED."
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Longest accepted (rendered) prompt, in tokens.")
    max_new_tokens_limit: int = Field(512, ge=1, description="Largest accepted params.max_new_tokens.")
    default_max_new_tokens: int = Field(64, ge=1, description="max_new_tokens when a request sends 0.")
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        description="When idle, wait this long after the first request for others to share its prefill.",
    )
    max_update_bytes: int = Field(
        8 * 2**30, ge=1, description="Largest streamed weight update (sum of chunk bytes)."
    )
    weight_roots: list[str] = Field(
        [],
        description="When set, UpdateWeights by checkpoint_path reads only files under one of these directories "
        "(every shard checked, symlinks resolved); the chart sets the push, model and checkpoint mounts.",
    )
