"""The demo's wiring: the three services started as local processes, the base model, and the SFT, reward
model and PPO trainer jobs run in this process against those services, configured from ``DemoConfig``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf.core.launcher import Launcher, ServiceProcess
from rlhf.core.models import make_tiny_causal_lm, resolve_model_path
from rlhf.demo.config import DemoConfig
from rlhf.trainer.config import PPOConfig, RewardModelConfig, SFTConfig
from rlhf.trainer.ppo import run_ppo
from rlhf.trainer.reward_model import run_reward_model
from rlhf.trainer.sft import run_sft


def threads_env(threads: int) -> dict[str, str]:
    """Environment of every process the demo starts: its torch threads, offline Hugging Face."""
    return {
        "RLHF_TORCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def base_model_path(settings: DemoConfig, run_dir: Path) -> Path:
    """The base model's folder: SmolLM2, a tiny random Llama built into the run folder, or the one given."""
    if settings.model == "tiny":
        folder = run_dir / "models" / "base"
        if not (folder / "config.json").exists():
            make_tiny_causal_lm(folder, seed=settings.seed)
        return folder
    return resolve_model_path(settings.model)


def start_services(
    launcher: Launcher, settings: DemoConfig, run_dir: Path, base: Path
) -> dict[str, ServiceProcess]:
    """The feedback store (SQLite in the run folder), the generation service serving ``base`` and an empty
    reward service, started side by side: each spends its first seconds importing torch and loading a model."""
    common = ["--torch-threads", str(settings.torch_threads), "--log-level", "WARNING"]
    specs = {
        "feedback": ["--database-url", f"sqlite:///{run_dir / 'feedback.db'}", *common],
        "generation": [
            "--model",
            str(base),
            "--max-batch-size",
            str(max(16, settings.generation_batch)),
            "--max-new-tokens-limit",
            str(max(64, settings.response_length)),
            *common,
        ],
        "reward": [*common],
    }
    with ThreadPoolExecutor(max_workers=len(specs)) as starter:
        futures = {
            name: starter.submit(launcher.start, name, ["serve", name], args=args)
            for name, args in specs.items()
        }
        return {name: f.result() for name, f in futures.items()}


def _job_common(
    settings: DemoConfig, run_dir: Path, job: str, *, model: Path, snapshot: str, feedback_target: str
) -> dict:
    """What every trainer job of the demo shares: no own server or metrics port, no intermediate checkpoints,
    its run folder ``run_dir/job``, its data a snapshot of the demo's store."""
    return dict(
        port=0,
        metrics_port=-1,
        host="127.0.0.1",
        run_dir=str(run_dir / job),
        model=str(model),
        snapshot=snapshot,
        feedback_target=feedback_target,
        seed=settings.seed,
        torch_threads=settings.torch_threads,
        max_length=settings.max_length,
        checkpoint_every=0,
        keep_checkpoints=1,
        progress=settings.progress,
        log_level="WARNING",
    )


#: The supervised jobs (SFT, reward model) of the demo: on this machine's CPU, evaluated once, at the end.
SUPERVISED = {"device": "cpu", "eval_every": 0}


def sft_config(
    settings: DemoConfig, base: Path, services: dict[str, ServiceProcess], snapshot: str, run_dir: Path
) -> SFTConfig:
    """SFT of the base model on the store's demonstrations snapshot."""
    feedback = services["feedback"].target
    return SFTConfig(
        **_job_common(settings, run_dir, "sft", model=base, snapshot=snapshot, feedback_target=feedback),
        **SUPERVISED,
        epochs=settings.sft_epochs,
        learning_rate=settings.sft_learning_rate,
        batch_size=settings.sft_batch_size,
        micro_batch_size=settings.sft_batch_size,
        lr_scheduler="linear",
    )


def reward_model_config(
    settings: DemoConfig, sft_path: Path, services: dict[str, ServiceProcess], snapshot: str, run_dir: Path
) -> RewardModelConfig:
    """The reward model from the SFT model on the store's comparisons-and-ratings snapshot."""
    feedback = services["feedback"].target
    common = _job_common(
        settings, run_dir, "reward_model", model=sft_path, snapshot=snapshot, feedback_target=feedback
    )
    return RewardModelConfig(
        **common,
        **SUPERVISED,
        epochs=settings.rm_epochs,
        learning_rate=settings.rm_learning_rate,
        head_learning_rate=settings.head_learning_rate,
        trainable_layers=settings.trainable_layers,
        group_by_prompt=settings.group_by_prompt,
        batch_size=settings.rm_batch_size,
        micro_batch_size=settings.rm_batch_size,
        eval_batch_size=32,
        version=f"demo-rm-s{settings.seed}",
    )


def ppo_config(
    settings: DemoConfig, sft_path: Path, services: dict[str, ServiceProcess], snapshot: str, run_dir: Path
) -> PPOConfig:
    """PPO from the SFT model against the demo's generation and reward services."""
    feedback = services["feedback"].target
    return PPOConfig(
        **_job_common(settings, run_dir, "ppo", model=sft_path, snapshot=snapshot, feedback_target=feedback),
        prompt_kinds=["prompt"],
        generation_target=services["generation"].target,
        reward_target=services["reward"].target,
        batch_size=settings.ppo_rollouts,
        micro_batch_size=settings.ppo_rollouts,
        response_length=settings.response_length,
        temperature=settings.temperature,
        max_steps=settings.ppo_iterations,
        learning_rate=settings.ppo_learning_rate,
        kl_coef=settings.kl_coef,
        adaptive_kl=settings.target_kl is not None,
        **({"target_kl": settings.target_kl} if settings.target_kl is not None else {}),
        advantage_estimator=settings.advantage_estimator,
        samples_per_prompt=settings.samples_per_prompt,
        num_ppo_epochs=settings.num_ppo_epochs,
        num_mini_batches=settings.num_mini_batches,
    )


def train_sft(cfg: SFTConfig) -> Path:
    return Path(run_sft(cfg))


def train_reward_model(cfg: RewardModelConfig) -> Path:
    return Path(run_reward_model(cfg))


def train_ppo(cfg: PPOConfig) -> tuple[Path, Path]:
    """The final PPO model's folder and the job's metrics file."""
    return Path(run_ppo(cfg)), Path(cfg.run_dir) / "metrics.jsonl"
