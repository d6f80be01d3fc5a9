"""Settings of one demo run: one config type, ``DemoConfig``, whose defaults are the default preset.

The other presets are copies of :data:`DEFAULT` naming only what differs. A run starts from the preset it
names, then every field set explicitly (flag, ``--config`` YAML, ``RLHF_DEMO_*``) replaces the preset's value
(:func:`resolve`). Fields that mean what a trainer job's field means carry the job's name (``kl_coef``,
``response_length``, ``trainable_layers``, ...); the ones the three jobs share (epochs, learning rate, batch
size) carry the job's prefix. Light module: the ``rlhf demo`` command line is built from it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from rlhf.core.config import BaseConfig

STAGES = ("services", "demonstrations", "sft", "comparisons", "reward_model", "ppo", "evaluation", "report")


class DemoConfig(BaseConfig):
    """Settings of one demo run (defaults: the default preset; a preset replaces the fields it names)."""

    section: ClassVar[str] = "demo"

    # ---- the run
    preset: Literal["default", "quick", "tiny"] = Field(
        "default",
        description="'default': SmolLM2-135M-Instruct, about 23 minutes on 2 free cores; 'quick': SmolLM2 with "
        "a few PPO iterations (a smoke run, minutes); 'tiny': a tiny random model that runs the same flow in "
        "under 2 minutes (tests). The preset sets every size below; a size given explicitly wins.",
    )
    run_dir: str = Field("", description="Folder of the run (default: runs/demo-<UTC time>).")
    seed: int = Field(0, ge=0, description="Seed of sampling, labelers and training.")
    model: str = Field(
        "default",
        description="Base model: 'default' (SmolLM2-135M-Instruct), 'tiny' (a tiny random Llama built into the "
        "run folder) or a model folder.",
    )
    torch_threads: int = Field(2, ge=1, le=64, description="torch threads of every process the demo starts.")
    progress: bool = Field(True, description="Progress bars and per-stage ETA on stderr.")

    # ---- sampling (the generation service)
    response_length: int = Field(48, ge=1, description="Largest number of new tokens of a sampled reply.")
    temperature: float = Field(
        0.7, gt=0, description="Sampling temperature of the SFT samples, PPO rollouts and evaluation."
    )
    max_length: int = Field(256, ge=8, description="Longest prompt+response (tokens) the trainer jobs take.")
    generation_batch: int = Field(
        64, ge=1, description="Sequences in flight to the generation service (it batches them)."
    )

    # ---- demonstrations: the gold-best of demo_k base samples
    demo_prompts: int = Field(128, ge=1, description="Prompts given to the demonstrator.")
    demo_k: int = Field(4, ge=1, description="Base samples per demonstration prompt.")
    demo_temperature: float = Field(0.8, gt=0, description="Sampling temperature of those base samples.")

    # ---- SFT
    sft_epochs: float = Field(2.0, gt=0, description="SFT epochs over the demonstrations.")
    sft_learning_rate: float = Field(2e-5, gt=0, description="SFT peak learning rate.")
    sft_batch_size: int = Field(8, ge=1, description="SFT examples per optimizer step.")

    # ---- comparisons and ratings
    base_comparisons: bool = Field(
        True, description="Every pair of the demonstration stage's base samples is compared too."
    )
    comparison_prompts: int = Field(100, ge=1, description="Prompts whose SFT samples are compared.")
    comparison_samples: int = Field(
        4, ge=2, description="SFT samples per comparison prompt; every pair of them is compared."
    )
    comparison_labelers: int = Field(3, ge=1, description="Comparers who judge each pair (one record each).")
    rating_prompts: int = Field(48, ge=0, description="Prompts whose SFT samples are rated.")

    # ---- reward model
    rm_epochs: float = Field(1.0, gt=0, description="Reward-model epochs.")
    rm_learning_rate: float = Field(2e-4, gt=0, description="Reward-model peak learning rate.")
    head_learning_rate: float = Field(
        2e-3, gt=0, description="Learning rate of the reward model's score head."
    )
    rm_batch_size: int = Field(32, ge=1, description="Reward-model comparisons per optimizer step.")
    trainable_layers: int = Field(
        2, ge=0, description="The reward model trains its top N layers and the head (0 = the whole model)."
    )
    group_by_prompt: bool = Field(
        True,
        description="All pairs of a prompt in one reward-model batch: one forward per reply, not per pair.",
    )

    # ---- PPO
    ppo_iterations: int = Field(20, ge=1, description="PPO iterations.")
    ppo_rollouts: int = Field(16, ge=1, description="Rollouts per PPO iteration.")
    ppo_learning_rate: float = Field(2e-5, gt=0, description="PPO peak learning rate of the policy.")
    kl_coef: float = Field(0.1, ge=0, description="Coefficient of the per-token KL penalty to the SFT model.")
    # The presets leave it unset: with its usual horizon (10,000 rollouts) the controller moves the coefficient
    # by < 1% in a run of a few hundred rollouts, so "adaptive" would only be a claim.
    target_kl: float | None = Field(
        None,
        gt=0,
        description="Per-response KL the adaptive controller steers kl_coef to (unset: a fixed kl_coef).",
    )
    advantage_estimator: Literal["gae", "rloo"] = Field(
        "rloo", description="'rloo' (baseline: the other samples of the prompt) or 'gae' (value head)."
    )
    samples_per_prompt: int = Field(4, ge=1, description="PPO rollouts per prompt.")
    num_ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    num_mini_batches: int = Field(2, ge=1, description="Optimizer steps per PPO epoch.")

    # ---- evaluation
    eval_prompts: int = Field(0, ge=0, description="Held-out prompts to evaluate on (0 = all of them).")
    eval_samples: int = Field(
        2,
        ge=1,
        le=16,
        description="Samples per eval prompt and policy; the win rate meets every PPO sample with every SFT "
        "sample of its prompt.",
    )

    # ---- the ETA display only
    stage_estimates: dict[str, float] = Field(
        {
            "services": 5,
            "demonstrations": 130,
            "sft": 145,
            "comparisons": 125,
            "reward_model": 150,
            "ppo": 575,
            "evaluation": 215,
            "report": 5,
        },
        description="Seconds each stage is expected to take (drives the ETA).",
    )


DEFAULT = DemoConfig()

PRESETS: dict[str, DemoConfig] = {
    "default": DEFAULT,
    "quick": DEFAULT.model_copy(
        update=dict(
            preset="quick",
            response_length=24,
            max_length=160,
            demo_prompts=16,
            demo_k=2,
            sft_epochs=1.0,
            comparison_prompts=16,
            comparison_samples=3,
            comparison_labelers=1,
            rating_prompts=4,
            rm_learning_rate=5e-5,
            head_learning_rate=5e-4,
            rm_batch_size=16,
            ppo_iterations=3,
            ppo_rollouts=4,
            ppo_learning_rate=1e-5,
            kl_coef=0.05,
            samples_per_prompt=2,
            num_ppo_epochs=1,
            num_mini_batches=1,
            eval_prompts=12,
            eval_samples=1,
            stage_estimates={
                "services": 15,
                "demonstrations": 10,
                "sft": 15,
                "comparisons": 15,
                "reward_model": 40,
                "ppo": 30,
                "evaluation": 20,
                "report": 5,
            },
        )
    ),
    "tiny": DEFAULT.model_copy(
        update=dict(
            preset="tiny",
            model="tiny",
            response_length=12,
            temperature=1.0,
            max_length=128,
            generation_batch=32,
            demo_prompts=24,
            demo_k=2,
            demo_temperature=1.0,
            sft_epochs=1.0,
            sft_learning_rate=1e-3,
            comparison_prompts=24,
            comparison_samples=3,
            comparison_labelers=2,
            rating_prompts=8,
            rm_learning_rate=1e-3,
            head_learning_rate=1e-2,
            rm_batch_size=16,
            trainable_layers=1,
            ppo_iterations=2,
            ppo_rollouts=8,
            ppo_learning_rate=1e-4,
            kl_coef=0.05,
            samples_per_prompt=2,
            num_ppo_epochs=1,
            num_mini_batches=1,
            eval_prompts=16,
            stage_estimates={
                "services": 8,
                "demonstrations": 3,
                "sft": 5,
                "comparisons": 3,
                "reward_model": 5,
                "ppo": 15,
                "evaluation": 5,
                "report": 3,
            },
        )
    ),
}

#: The sizes that drive each stage's time: the ETA scales a stage's estimate by how far they moved.
STAGE_DRIVERS = {
    "demonstrations": ("demo_prompts",),
    "sft": ("demo_prompts",),
    "comparisons": ("comparison_prompts",),
    "reward_model": ("comparison_prompts",),
    "ppo": ("ppo_iterations", "ppo_rollouts"),
    "evaluation": ("eval_samples",),
}

#: Fields that say where and how a run shows itself, not what it computes: left out of the reproducing command.
_NOT_IN_COMMAND = ("preset", "seed", "run_dir", "progress", "stage_estimates")


def _scaled_estimates(preset: DemoConfig, resolved: DemoConfig) -> dict[str, float]:
    estimates = dict(preset.stage_estimates)
    for stage, names in STAGE_DRIVERS.items():
        for name in names:
            before, after = getattr(preset, name), getattr(resolved, name)
            if stage in estimates and before and after != before:
                estimates[stage] *= after / before
    return estimates


def resolve(cfg: DemoConfig) -> DemoConfig:
    """The settings of the run ``cfg`` asks for: its preset, with every field ``cfg`` sets explicitly."""
    preset = PRESETS[cfg.preset]
    chosen = {name: getattr(cfg, name) for name in cfg.model_fields_set if name != "preset"}
    resolved = preset.model_copy(update=chosen)
    if "stage_estimates" in chosen:
        return resolved
    return resolved.model_copy(update={"stage_estimates": _scaled_estimates(preset, resolved)})


def command_line(settings: DemoConfig) -> str:
    """The ``rlhf demo`` command that reproduces ``settings`` (resolved; run folder and progress left out)."""
    preset = PRESETS[settings.preset]
    parts = ["rlhf", "demo", "--preset", settings.preset, "--seed", str(settings.seed)]
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name in _NOT_IN_COMMAND or value == getattr(preset, name):
            continue
        flag = name.replace("_", "-")
        parts += (
            [f"--{flag}" if value is True else f"--no-{flag}"]
            if isinstance(value, bool)
            else [f"--{flag}", str(value)]
        )
    return " ".join(parts)
