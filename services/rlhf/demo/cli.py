"""``rlhf demo``: the whole loop (demonstrations -> SFT -> comparisons -> reward model -> PPO -> evaluation) on
one machine, with the services as local processes and simulated labelers. Light module: the pipeline (torch,
transformers) is imported only when the command runs.
"""

from __future__ import annotations

import sys

from rlhf.cli import config_command
from rlhf.demo.config import DemoConfig


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
