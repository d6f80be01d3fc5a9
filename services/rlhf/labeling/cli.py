"""``rlhf feedback enqueue``: add labeling tasks to the queue, from a JSONL file or by sampling responses from the
generation service (light module: no database imports until the command runs)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from rlhf.cli import Command
from rlhf.feedback.config import FeedbackConfig


def _enqueue_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("where the tasks come from (one of)")
    source.add_argument(
        "file",
        nargs="?",
        help='JSONL of tasks (\'-\' = stdin): {"prompt": P, "responses": [R, R, ...]} to compare or '
        '{"prompt": P, "response": R} to rate; optional idempotency_key, redundancy, source, metadata.',
    )
    source.add_argument(
        "--sample-from",
        metavar="HOST:PORT",
        help="Instead of a file: sample responses from this generation service for stored prompts that have "
        "no labeling task yet.",
    )
    sampling = parser.add_argument_group("sampling (with --sample-from)")
    sampling.add_argument(
        "--responses", type=int, default=2, help="Responses per prompt (1 = rate; default 2)."
    )
    sampling.add_argument("--limit", type=int, default=0, help="At most this many prompts (0 = all).")
    sampling.add_argument("--max-new-tokens", type=int, default=256, help="Longest response (default 256).")
    sampling.add_argument(
        "--temperature", type=float, default=1.0, help="Sampling temperature (default 1.0)."
    )
    sampling.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling (default 1.0).")
    sampling.add_argument("--seed", type=int, default=None, help="Sampling seed (default: random).")
    sampling.add_argument("--batch-size", type=int, default=8, help="Prompts per Generate call (default 8).")
    sampling.add_argument(
        "--generation-token",
        default=os.environ.get("RLHF_AUTH_TOKEN"),
        help="Bearer token for --sample-from (default: $RLHF_AUTH_TOKEN).",
    )
    parser.add_argument(
        "--redundancy",
        type=int,
        default=1,
        help="Judgments wanted per task, each from a different labeler (default 1; a task line may set its own).",
    )
    parser.add_argument("--source", default="", help="Source of tasks that name none.")
    parser.add_argument(
        "--database-url",
        help="The feedback database (sqlite:///FILE or postgresql://...); tasks go straight in.",
    )
    parser.add_argument("--config", metavar="FILE", help="Feedback YAML config (database_url, limits).")


def _file_specs(args: argparse.Namespace) -> list:
    from rlhf.labeling.sources import read_task_jsonl

    with contextlib.ExitStack() as stack:
        f = sys.stdin if args.file == "-" else stack.enter_context(open(args.file, encoding="utf-8"))
        return read_task_jsonl(f, default_source=args.source)


def _sampled_specs(args: argparse.Namespace, prompts) -> tuple[list, int]:
    """Tasks from responses the generation service samples for ``prompts``; (tasks, prompts dropped)."""
    from rlhf.generation.client import PolicyClient
    from rlhf.labeling.sources import sample_tasks

    client = PolicyClient(args.sample_from, token=args.generation_token)
    try:
        return sample_tasks(
            client,
            prompts,
            responses=args.responses,
            batch_size=args.batch_size,
            source=args.source or "generation",
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            return_prompt_token_ids=False,
        )
    finally:
        client.close()


def _generation_client_installed() -> bool:
    try:
        import rlhf.generation.client  # noqa: F401
    except ImportError:
        return False
    return True


def _enqueue(args: argparse.Namespace, config: FeedbackConfig) -> int:
    from rlhf.feedback.store import FeedbackStore
    from rlhf.labeling.queue import LabelingQueue
    from rlhf.labeling.sources import prompts_without_tasks

    where = args.file or args.sample_from
    with FeedbackStore.from_config(config) as store:
        queue = LabelingQueue(store, redundancy=args.redundancy)
        dropped = 0
        if args.file:
            specs = _file_specs(args)
        else:
            if not _generation_client_installed():
                print(
                    "enqueue: the generation client (rlhf.generation.client) is not installed",
                    file=sys.stderr,
                )
                return 1
            prompts = prompts_without_tasks(store, args.limit)
            if not prompts:
                print("enqueue: every stored prompt already has a labeling task", file=sys.stderr)
                return 0
            specs, dropped = _sampled_specs(args, prompts)
        result = queue.enqueue(specs) if specs else None
        depth = queue.judgments_needed()
    created, existing = (result.created, result.existing) if result else (0, 0)
    note = f"; {dropped} prompts dropped (fewer distinct responses than asked for)" if dropped else ""
    print(
        f"{where}: queued {created} new tasks ({existing} already queued){note}; "
        f"{depth} judgments now wanted in the queue",
        file=sys.stderr,
    )
    return 0


def _run_enqueue(args: argparse.Namespace) -> int:
    import grpc

    from rlhf.core.config import load_config
    from rlhf.core.errors import ServiceError

    if bool(args.file) == bool(args.sample_from):
        print("enqueue: give a JSONL file or --sample-from HOST:PORT (one of them)", file=sys.stderr)
        return 2
    overrides = {"database_url": args.database_url, "database_url_file": None} if args.database_url else {}
    config = load_config(FeedbackConfig, args.config, overrides)
    where = args.file or args.sample_from
    try:
        return _enqueue(args, config)
    except ServiceError as exc:
        print(f"{where}: {exc.message}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"{where}: generation failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


ENQUEUE = Command(
    help="Add labeling tasks (a prompt with responses to compare or rate) to the labeling queue.",
    add_arguments=_enqueue_arguments,
    run=_run_enqueue,
    description="Queue tasks for the labeling page, from a JSONL file or by sampling responses from the "
    "generation service for stored prompts. Idempotent: re-running creates no duplicate tasks. Labelers "
    "judge them at `rlhf serve feedback --labeling-port PORT`.",
)
