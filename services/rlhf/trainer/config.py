"""Configuration of the trainer jobs: one pydantic model per job, loaded from YAML, environment and flags.

``TrainJobConfig`` holds what every job shares (run folder and resume, seed, model, where the data comes from,
batch sizes and optimizer, step budget, checkpoint cadence, and the job's own TrainerService server via
:class:`rlhf.core.config.ServerConfig`). ``SupervisedJobConfig`` adds what the supervised jobs share (device,
eval batch size and cadence); ``SFTConfig`` (section ``sft``) and ``RewardModelConfig`` (section
``reward_model``) extend it with their own fields. The PPO job's config is ``PPOConfig(TrainJobConfig)`` with section
``ppo``.

Environment: ``RLHF_<FIELD>`` for every job, ``RLHF_SFT_<FIELD>`` / ``RLHF_REWARD_MODEL_<FIELD>`` /
``RLHF_PPO_<FIELD>`` for one job (see rlhf.core.config for precedence).

Batch sizes are global: ``batch_size`` examples per optimizer step, summed over all data-parallel ranks
(torchrun), so the same config gives the same optimization on one process or several. Each rank processes
``batch_size / world_size`` examples per step in micro-batches of at most ``micro_batch_size``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.core.config import ServerConfig, metrics_port_field, port_field, secret_field


class TrainJobConfig(ServerConfig):
    """Settings every trainer job shares."""

    section: ClassVar[str] = "trainer"
    #: Short name of the job kind, used in run folder names and metric labels.
    kind: ClassVar[str] = "job"

    # ---- the job's TrainerService server: host, TLS, auth, limits... from ServerConfig (the job serves them all
    # through rlhf.core.server.ServerThread); only the defaults of the ports and the grace period differ ----
    port: int = port_field(50054, "TrainerService gRPC port")
    metrics_port: int = metrics_port_field(9094)
    serve: bool = Field(True, description="Serve rlhf.v1.TrainerService while the job runs (rank 0 only).")
    grace_seconds: float = Field(
        2.0, ge=0, description="At the end of the job: seconds in-flight status calls get to finish."
    )

    # ---- run folder, resume, reproducibility ----
    run_dir: str = Field(
        "",
        description="Folder of this run: checkpoints/, metrics.jsonl, final/ (default: runs/<kind>-<UTC time>).",
    )
    resume: bool = Field(
        False, description="Continue the run in run_dir from its latest checkpoint (fresh start if none)."
    )
    seed: int = Field(0, ge=0, description="Seed of model init, data order and sampling.")

    # ---- model ----
    model: str = Field(
        "default",
        description="Starting model: an HF folder, or 'default' for the built-in SmolLM2-135M-Instruct.",
    )
    max_length: int = Field(512, ge=8, description="Longest prompt+response in tokens; longer ones are cut.")

    # ---- data: a feedback-store snapshot, or a JSONL file for offline use ----
    feedback_target: str | None = Field(
        None, description="host:port of the feedback store (rlhf.v1.FeedbackService)."
    )
    feedback_token: str | None = secret_field("Bearer token for feedback_target.")
    feedback_database_url: str | None = secret_field(
        "Read the feedback store's database directly (sqlite:///FILE or postgresql://...) instead of feedback_target."
    )
    snapshot: str = Field(
        "", description="Feedback-store snapshot to train on; its train/eval split is used as is."
    )
    data_file: str | None = Field(
        None,
        description="JSONL file in the TRL formats (prompt/completion, messages, prompt/chosen/rejected, ratings) instead of the feedback store.",
    )
    eval_data_file: str | None = Field(
        None, description="JSONL eval set; default: eval_fraction of data_file held out."
    )
    eval_fraction: float = Field(
        0.1, ge=0, le=0.9, description="With data_file and no eval_data_file: share of records held out."
    )

    # ---- optimization ----
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = Field(
        8, ge=1, description="Largest forward/backward batch on one rank (gradient accumulation above it)."
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = no clipping).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Learning-rate schedule after warmup (decays to 0 at the last step)."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to learning_rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (max_steps wins when set).")
    max_steps: int = Field(0, ge=0, description="Optimizer steps to run (0 = as many as epochs need).")

    # ---- cadence ----
    checkpoint_every: int = Field(
        100, ge=0, description="Checkpoint every N steps (0 = only on request/stop)."
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Newest checkpoints kept on disk; older ones are deleted."
    )
    progress: bool | None = Field(
        None, description="Show a progress bar (default: only when stderr is a terminal)."
    )

    @model_validator(mode="after")
    def _check_data_source(self):
        if self.data_file and (self.snapshot or self.feedback_target or self.feedback_database_url):
            raise ValueError("data_file: give either data_file or a feedback-store snapshot, not both")
        return self

    def resolved_run_dir(self) -> Path:
        """run_dir, or a new ``runs/<kind>-<UTC time>`` folder name when it is empty."""
        if self.run_dir:
            return Path(self.run_dir)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{self.kind}-{stamp}"


class SupervisedJobConfig(TrainJobConfig):
    """What the supervised jobs (SFT, reward model) add: their device, and an eval set scored as they train."""

    device: str = Field(
        "auto",
        description="'auto' (cuda when available, under torchrun cuda:LOCAL_RANK), 'cpu' or 'cuda[:N]'.",
    )
    eval_batch_size: int = Field(16, ge=1, description="Examples per forward pass during evaluation.")
    eval_every: int = Field(
        50, ge=0, description="Evaluate every N steps and at the end (0 = only at the end)."
    )


class SFTConfig(SupervisedJobConfig):
    """Supervised fine-tuning on demonstrations: loss on the response tokens only."""

    section: ClassVar[str] = "sft"
    kind: ClassVar[str] = "sft"

    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")


class RewardModelConfig(SupervisedJobConfig):
    """A reward model on comparisons (and ratings turned into comparisons), Bradley–Terry loss."""

    section: ClassVar[str] = "reward_model"
    kind: ClassVar[str] = "reward_model"

    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate of AdamW.")
    rating_margin: float = Field(
        0.0,
        ge=0,
        description="Two ratings of one prompt become a comparison when their scores (scaled to 0..1) differ by more than this.",
    )
    center_rewards_coef: float = Field(
        0.0, ge=0, description="Weight of the (r_chosen + r_rejected)^2 term that keeps rewards centred at 0."
    )
    version: str = Field("", description="Version string stored in rlhf_reward.json (default: the run name).")
    trainable_layers: int = Field(
        0,
        ge=0,
        description="Train only the top N transformer layers, the final norm and the score head (0 = the whole "
        "model). The frozen lower part then runs once per distinct sequence and its outputs are cached, so an "
        "epoch costs the top layers only.",
    )
    head_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the score head (default: learning_rate)."
    )
    group_by_prompt: bool = Field(
        False,
        description="Order each epoch's pairs so that the pairs of one prompt land in the same batch (prompts "
        "shuffled per epoch by seed; a prompt's pairs may straddle two batches; batch_size still counts pairs). "
        "A response in several pairs of a batch is scored once, so a batch costs one forward per distinct "
        "response instead of two per pair (InstructGPT trains on all comparisons of a prompt as one batch "
        "element and reports less overfitting than with shuffled pairs).",
    )


class PPOConfig(TrainJobConfig):
    """PPO from the SFT model against the generation and reward services (names as TRL's PPO config).

    One iteration = one rollout of ``batch_size`` responses (``batch_size / samples_per_prompt`` prompts),
    then ``num_ppo_epochs`` passes over it in ``num_mini_batches`` optimizer steps each, then a weight push.
    ``max_steps`` counts iterations (0 = ``epochs`` passes over the prompts).
    """

    section: ClassVar[str] = "ppo"
    kind: ClassVar[str] = "ppo"

    # ---- services ----
    generation_target: str = Field(
        "127.0.0.1:50051", description="host:port of the policy generation service (rlhf.v1.PolicyService)."
    )
    generation_token: str | None = secret_field("Bearer token for generation_target.")
    reward_target: str = Field(
        "127.0.0.1:50052", description="host:port of the reward service (rlhf.v1.RewardService)."
    )
    reward_token: str | None = secret_field("Bearer token for reward_target.")
    service_timeout: float = Field(
        300.0, gt=0, description="Deadline in seconds of one Generate / Score / UpdateWeights attempt."
    )
    service_retry_seconds: float = Field(
        120.0,
        ge=0,
        description="How long a service may stay unavailable (retried with backoff) before the job checkpoints and ends.",
    )
    push_dir: str = Field(
        "/dev/shm",
        description="Folder shared with the generation service for path-based weight pushes ('' = stream the bytes over gRPC).",
    )

    # ---- models ----
    reference_model: str | None = Field(
        None, description="Frozen reference for the KL penalty (default: model, the SFT checkpoint)."
    )

    # ---- rollouts ----
    batch_size: int = Field(16, ge=1, description="Rollouts (responses) per PPO iteration.")
    micro_batch_size: int = Field(
        16, ge=1, description="Largest forward/backward batch (gradient accumulation above it)."
    )
    samples_per_prompt: int = Field(
        1, ge=1, description="Responses sampled per prompt (batch_size / this prompts)."
    )
    response_length: int = Field(48, ge=1, description="Largest number of new tokens of a response.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (the logprobs use the same).")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling mass (PPO's ratios assume 1: the full distribution)."
    )
    prompt_kinds: list[str] = Field(
        ["prompt", "demonstration", "comparison"],
        description="Record kinds whose prompts make the PPO prompt set.",
    )

    # ---- PPO ----
    learning_rate: float = Field(3e-6, gt=0, description="Peak learning rate of AdamW for the policy.")
    value_learning_rate: float = Field(1e-4, gt=0, description="Learning rate of the value head.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warmup."
    )
    num_ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    num_mini_batches: int = Field(1, ge=1, description="Optimizer steps per PPO epoch.")
    cliprange: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the value function.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    advantage_estimator: Literal["gae", "rloo"] = Field(
        "gae",
        description="'gae': GAE with the value head (PPO as in Ziegler et al. / TRL PPO); 'rloo': the mean "
        "return of the other samples of the same prompt as baseline (needs samples_per_prompt >= 2; no value "
        "loss), with the same clipped PPO objective and KL penalty.",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="Lambda of GAE.")
    whiten_rewards: bool = Field(False, description="Whiten the shaped rewards before GAE.")
    kl_coef: float = Field(0.05, ge=0, description="Initial coefficient of the per-token KL penalty.")
    adaptive_kl: bool = Field(True, description="Adapt kl_coef towards target_kl (Ziegler et al. 2019).")
    target_kl: float = Field(6.0, gt=0, description="Target per-sequence KL of the adaptive controller.")
    kl_horizon: float = Field(10000.0, gt=0, description="Horizon (in rollouts) of the adaptive controller.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator of the penalty.")
    missing_eos_penalty: float | None = Field(
        1.0, description="Subtracted from the score of a response that never ends (unset = no penalty)."
    )
    normalize_scores: bool = Field(
        True, description="Use the reward service's normalized scores (reward checkpoint mean/std)."
    )
    reward_clip: float | None = Field(None, gt=0, description="Clip scores to [-reward_clip, reward_clip].")
    reuse_generation_logprobs: bool = Field(
        True,
        description="Use the generation service's logprobs as the old logprobs when its policy version is the trainer's.",
    )
    checkpoint_every: int = Field(
        10, ge=0, description="Checkpoint every N iterations (0 = only on request/stop)."
    )

    @model_validator(mode="after")
    def _check_ppo_batches(self):
        if self.batch_size % self.samples_per_prompt:
            raise ValueError("batch_size: must be a multiple of samples_per_prompt")
        if self.advantage_estimator == "rloo" and self.samples_per_prompt < 2:
            raise ValueError("advantage_estimator: 'rloo' needs samples_per_prompt >= 2")
        if self.batch_size % self.num_mini_batches:
            raise ValueError("num_mini_batches: must divide batch_size")
        return self
