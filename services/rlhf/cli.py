"""The ``rlhf`` console command.

Each subcommand lives next to the code it runs, as a :class:`Command` in a light module (no torch at import
time, so ``rlhf --help`` is fast); this file only lists where they are.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rlhf import __version__
from rlhf.core.config import BaseConfig, add_config_arguments, config_from_args, set_process_env_defaults


@dataclass
class Command:
    """A subcommand: one-line help, a function adding its flags, a function running it (returns an exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


def config_command(
    help: str, config_cls: type[BaseConfig], run: Callable[[BaseConfig], int | None], description=None
):
    """A Command whose flags are generated from ``config_cls`` (plus ``--config FILE``)."""
    return Command(
        help=help,
        add_arguments=lambda p: add_config_arguments(p, config_cls),
        run=lambda args: run(config_from_args(config_cls, args)),
        description=description,
    )


# (group, name) -> "module:ATTRIBUTE" holding a Command. group None = top-level command.
COMMANDS: dict[tuple[str | None, str], str] = {
    ("serve", "generation"): "rlhf.generation.cli:SERVE",
    ("serve", "reward"): "rlhf.reward.cli:SERVE",
    ("serve", "feedback"): "rlhf.feedback.cli:SERVE",
    ("train", "sft"): "rlhf.trainer.cli:SFT",
    ("train", "reward-model"): "rlhf.trainer.cli:REWARD_MODEL",
    ("train", "ppo"): "rlhf.trainer.cli:PPO",
    ("feedback", "import"): "rlhf.feedback.cli:IMPORT",
    ("feedback", "export"): "rlhf.feedback.cli:EXPORT",
    ("feedback", "enqueue"): "rlhf.labeling.cli:ENQUEUE",
    ("reward", "score"): "rlhf.reward.cli:SCORE",
    ("k8s", "submit"): "rlhf.k8s.cli:SUBMIT",
    ("k8s", "up"): "rlhf.k8s.cli:UP",
    (None, "demo"): "rlhf.demo.cli:DEMO",
}

GROUP_HELP = {
    "serve": "Run a service: the policy generation, reward scoring or feedback store gRPC server.",
    "train": "Run a trainer job: supervised fine-tuning, reward model or PPO.",
    "feedback": "Move human feedback in and out of the feedback store (JSONL).",
    "reward": "Use the reward scoring API from the command line.",
    "k8s": "Submit and follow trainer Jobs on Kubernetes; run the chart's pods on Docker (up --docker).",
}


def _load(ref: str) -> Command | None:
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # that part of the platform is not installed in this build
        raise
    return getattr(module, attr, None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="RLHF platform: policy generation, reward scoring, feedback store and trainer jobs as gRPC services.",
    )
    parser.add_argument("--version", action="version", version=f"rlhf {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for (group, name), ref in COMMANDS.items():
        command = _load(ref)
        if command is None:
            continue
        if group is None:
            sub = top.add_parser(name, help=command.help, description=_description(command))
        else:
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[group].add_parser(name, help=command.help, description=_description(command))
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def _description(command: Command) -> str:
    """The --help page opens with the one-line help, then the longer description if there is one."""
    if not command.description or command.description.startswith(command.help.rstrip(".")):
        return command.description or command.help
    return f"{command.help}\n\n{command.description}"


def main(argv: list[str] | None = None) -> int:
    set_process_env_defaults()  # before any command imports torch (libgomp reads OMP_WAIT_POLICY at load)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0 if args.command is None else 2
    result = args._run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
