"""``rlhf train sft``, ``rlhf train reward-model`` and ``rlhf train ppo`` (light module: torch is imported only
when a command runs). Flags are generated from the job's config class; ``--config FILE`` and ``RLHF_*``
environment variables work as for the services. Under ``torchrun`` the same commands train data-parallel.
"""

from __future__ import annotations

import sys

from rlhf.cli import Command, config_command
from rlhf.trainer import config as trainer_config
from rlhf.trainer.config import RewardModelConfig, SFTConfig


def _report(kind: str, run, cfg) -> int:
    """Run the job; print where its model went, or a one-line error: exit 2 for bad data or settings, 1 for
    a service that stayed down, 143/130/3 for a job stopped after its checkpoint."""
    import grpc

    from rlhf.core.errors import ServiceError
    from rlhf.trainer.job import JobStopped

    try:
        path = run(cfg)
    except JobStopped as exc:
        print(f"{kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, FileNotFoundError) as exc:
        print(f"{kind}: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"{kind}: {exc.code.name}: {exc.message}", file=sys.stderr)
        # a service that stayed down (UNAVAILABLE, DEADLINE_EXCEEDED) is an outage, worth retrying: exit 1;
        # everything else is bad data or settings: exit 2
        outage = exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return 1 if outage else 2
    except grpc.RpcError as exc:  # a service (feedback store, generation, reward) refused or stayed down
        print(f"{kind}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        bad_request = exc.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.UNAUTHENTICATED,
        )
        return 2 if bad_request else 1
    print(f"{kind}: {path}", file=sys.stderr)
    return 0


def _run_sft(cfg: SFTConfig) -> int:
    from rlhf.trainer.sft import run_sft

    return _report("sft model", run_sft, cfg)


def _run_reward_model(cfg: RewardModelConfig) -> int:
    from rlhf.trainer.reward_model import run_reward_model

    return _report("reward model", run_reward_model, cfg)


def _run_ppo(cfg) -> int:
    from rlhf.trainer.ppo import run_ppo

    return _report("ppo policy", run_ppo, cfg)


_JOB_HELP = (
    " Data from a feedback-store snapshot (--feedback-target HOST:PORT --snapshot NAME) or a JSONL file "
    "(--data-file). The job serves rlhf.v1.TrainerService on --port while it runs, checkpoints to "
    "RUN_DIR/checkpoints (SIGTERM or the Stop RPC: checkpoint, then stop) and continues a run with --resume."
)

SFT = config_command(
    "Supervised fine-tuning of the policy on demonstrations (loss on response tokens only).",
    SFTConfig,
    _run_sft,
    description="Supervised fine-tuning on <prompt, ideal response> demonstrations, formatted with the "
    "model's chat template; writes RUN_DIR/final, an HF folder the generation service loads." + _JOB_HELP,
)

REWARD_MODEL = config_command(
    "Train a reward model on comparisons and ratings (Bradley-Terry loss).",
    RewardModelConfig,
    _run_reward_model,
    description="Train a scalar reward model, initialised from a causal LM (usually the SFT model), on "
    "chosen/rejected pairs (ratings of the same prompt become pairs); reports held-out accuracy and writes "
    "RUN_DIR/final, a checkpoint the reward service loads (with reward mean/std)." + _JOB_HELP,
)

_PPOConfig = getattr(trainer_config, "PPOConfig", None)
PPO: Command | None = (
    config_command(
        "PPO against the generation and reward services, from the SFT model.",
        _PPOConfig,
        _run_ppo,
        description="PPO: every iteration asks the generation service for responses, the reward service "
        "for scores, and pushes the new weights back to the generation service." + _JOB_HELP,
    )
    if _PPOConfig is not None
    else None
)
