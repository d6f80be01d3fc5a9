"""``rlhf serve generation`` (light module: torch and transformers are imported only when it runs)."""

from __future__ import annotations

from rlhf.cli import config_command
from rlhf.generation.config import GenerationConfig


def _serve(config: GenerationConfig) -> int:
    from rlhf.generation.server import serve

    return serve(config)


SERVE = config_command(
    "Run the policy generation gRPC server (rlhf.v1.PolicyService).",
    GenerationConfig,
    _serve,
    description="Serve a causal LM (an HF folder, or 'default' for the built-in SmolLM2-135M-Instruct) with "
    "dynamic batching, per-request sampling parameters, per-token logprobs and versioned weight updates; or "
    "front a Text Generation Inference server (--backend tgi --tgi-url URL).",
)
