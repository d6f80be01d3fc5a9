"""``rlhf demo``: the whole loop (demonstrations -> SFT -> comparisons -> reward model -> PPO -> evaluation) on
one machine, with the services as local processes and simulated labelers. Light module: the pipeline (torch,
transformers) is imported only when the command runs.
"""

from __future__ import annotations

import sys
from typing import ClassVar, Literal

from pydantic import Field

from rlhf.cli import config_command
from rlhf.core.config import BaseConfig


class DemoConfig(BaseConfig):
    """Settings of one demo run (the preset fixes the sizes; the fields below override a few of them)."""

    section: ClassVar[str] = "demo"

    preset: Literal["default", "quick", "tiny"] = Field(
        "default",
        description="'default': SmolLM2-135M-Instruct, about 23 minutes on 2 free cores; 'quick': SmolLM2 with "
        "a few PPO iterations (a smoke run, minutes); 'tiny': a tiny random model that runs the same flow in "
        "under 2 minutes (tests).",
    )
    run_dir: str = Field("", description="Folder of the run (default: runs/demo-<UTC time>).")
    seed: int = Field(0, ge=0, description="Seed of sampling, labelers and training.")
    model: str | None = Field(
        None,
        description="Base model folder instead of the preset's (default SmolLM2 or a tiny random model).",
    )
    torch_threads: int = Field(2, ge=1, le=64, description="torch threads of every process the demo starts.")
    ppo_iterations: int = Field(0, ge=0, description="PPO iterations (0 = the preset's).")
    ppo_rollouts: int = Field(0, ge=0, description="Rollouts per PPO iteration (0 = the preset's).")
    demo_prompts: int = Field(0, ge=0, description="Prompts given to the demonstrator (0 = the preset's).")
    comparison_prompts: int = Field(
        0, ge=0, description="Prompts whose SFT samples are compared (0 = the preset's)."
    )
    rating_prompts: int = Field(
        0, ge=0, description="Prompts whose SFT samples are rated (0 = the preset's)."
    )
    eval_prompts: int = Field(0, ge=0, description="Held-out prompts to evaluate on (0 = the preset's).")
    eval_samples: int = Field(
        0,
        ge=0,
        le=16,
        description="Samples per eval prompt and policy (0 = the preset's); the win rate meets every PPO sample "
        "with every SFT sample of its prompt.",
    )
    progress: bool = Field(True, description="Progress bars and per-stage ETA on stderr.")


def _run(cfg: DemoConfig) -> int:
    from rlhf.demo.pipeline import DemoInterrupted, run_demo

    try:
        outcome = run_demo(cfg)
    except DemoInterrupted as exc:
        print(
            f"\nRLHF demo stopped during the {exc.stage or 'setup'} stage ({exc.reason}). The services it started "
            f"are stopped; what the finished stages wrote is in {exc.run_dir}",
            file=sys.stderr,
        )
        return exc.exit_code
    print(outcome.summary_text(), file=sys.stdout)
    return 0


DEMO = config_command(
    "Run SFT -> reward model -> PPO end to end on a built-in task with simulated labelers; writes a report.",
    DemoConfig,
    _run,
    description="Starts the feedback store (SQLite), the policy generation service and the reward service as "
    "local processes on free ports, has simulated labelers write demonstrations, comparisons and ratings into "
    "the store, trains SFT, a reward model and PPO through the services, evaluates base, SFT and PPO on held-out "
    "prompts against the hidden gold score, and writes report.md with plots into the run folder. The services "
    "are stopped at the end, on Ctrl-C and on failure.",
)
