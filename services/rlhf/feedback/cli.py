"""``rlhf serve feedback``, ``rlhf feedback import`` and ``rlhf feedback export`` (light module: no database
imports until a command runs).

import/export talk to a running server with ``--target HOST:PORT``, or open the database directly
(``--database-url``, else the feedback config: ``--config``, ``RLHF_FEEDBACK_DATABASE_URL``,
``RLHF_DATABASE_URL``, default ``sqlite:///./feedback.db``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys

from rlhf.cli import Command, config_command
from rlhf.feedback.config import FeedbackConfig


def _serve(config: FeedbackConfig) -> int:
    from rlhf.feedback.server import serve

    if config.labeling_port < 0:
        return serve(config)
    try:  # the labeling page needs Flask, an optional extra
        from rlhf.labeling.web import start_page
    except ModuleNotFoundError as exc:
        if exc.name not in ("flask", "werkzeug", "jinja2"):
            raise
        print(
            f"serve feedback: labeling_port is {config.labeling_port} but the labeling page needs Flask "
            f"({exc.name} is not installed): pip install 'rlhf-platform[labeling]', or set labeling_port to -1",
            file=sys.stderr,
        )
        return 2
    return serve(config, labeling_page=start_page)


SERVE = config_command(
    "Run the feedback store gRPC server (rlhf.v1.FeedbackService) on SQLite or PostgreSQL.",
    FeedbackConfig,
    _serve,
    description="Run the feedback store: prompts, demonstrations, comparisons, ratings and snapshots, with "
    "atomic idempotent batch writes and streaming export. Backend from --database-url (sqlite:///FILE or "
    "postgresql://...), RLHF_FEEDBACK_DATABASE_URL or RLHF_DATABASE_URL.",
)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where the records go / come from")
    where.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="A running feedback server (default: open the database directly).",
    )
    where.add_argument(
        "--token",
        default=os.environ.get("RLHF_AUTH_TOKEN"),
        help="Bearer token for --target (default: $RLHF_AUTH_TOKEN).",
    )
    where.add_argument("--tls-ca-file", help="CA certificate for a TLS --target.")
    where.add_argument(
        "--database-url", help="Open this database directly (sqlite:///FILE or postgresql://...)."
    )
    where.add_argument("--config", metavar="FILE", help="Feedback YAML config (database_url, limits).")


@contextlib.contextmanager
def _sink(args: argparse.Namespace):
    """A FeedbackClient (with --target) or a FeedbackStore: both have add_* and export."""
    if args.target:
        from rlhf.feedback.client import FeedbackClient

        with FeedbackClient(args.target, token=args.token, tls_ca_file=args.tls_ca_file) as client:
            yield client
        return
    from rlhf.core.config import load_config
    from rlhf.feedback.store import FeedbackStore

    overrides = {"database_url": args.database_url} if args.database_url else {}
    if args.database_url:
        overrides["database_url_file"] = None
    config = load_config(FeedbackConfig, args.config, overrides)
    with FeedbackStore.from_config(config) as store:
        yield store


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="JSONL file to import ('-' = stdin).")
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="Records per atomic write (default 1000)."
    )
    parser.add_argument("--labeler-id", default="", help="Labeler of lines that name none.")
    parser.add_argument("--source", default="", help="Source of prompt lines that name none.")
    parser.add_argument("--dry-run", action="store_true", help="Parse and validate the file; write nothing.")
    _add_connection_arguments(parser)


def _run_import(args: argparse.Namespace) -> int:
    from rlhf.core.errors import ServiceError
    from rlhf.feedback import jsonl, validation

    try:
        with contextlib.ExitStack() as stack:
            f = sys.stdin if args.file == "-" else stack.enter_context(open(args.file, encoding="utf-8"))
            parsed = jsonl.read_jsonl(f, default_labeler_id=args.labeler_id, default_source=args.source)
        if args.dry_run:
            checks = {
                "prompt": validation.check_prompt_record,
                "demonstration": validation.check_demonstration,
                "comparison": validation.check_comparison,
                "rating": validation.check_rating,
            }
            limits = validation.Limits()
            for item in parsed:
                try:
                    checks[item.kind](item.message, item.kind, limits)
                except ServiceError as exc:
                    raise jsonl.LineError(f"line {item.line_no}", exc.message) from None
            print(f"{args.file}: {len(parsed)} valid records (dry run, nothing written)", file=sys.stderr)
            return 0
        with _sink(args) as sink:
            summary = jsonl.import_records(parsed, sink, batch_size=args.batch_size)
    except ServiceError as exc:
        print(f"{args.file}: {exc.message}", file=sys.stderr)
        return 2
    except jsonl.ImportFailed as exc:
        print(f"{args.file}: {exc.code}: {exc}", file=sys.stderr)
        return 2 if exc.code in ("INVALID_ARGUMENT", "ALREADY_EXISTS") else 1
    kinds = ", ".join(f"{n} {k}s" for k, n in summary.by_kind.items())
    print(
        f"{args.file}: imported {summary.lines} records ({kinds}): {summary.created} new, "
        f"{summary.existing} already stored",
        file=sys.stderr,
    )
    return 0


def _time_us(text: str | None) -> int | None:
    if not text:
        return None
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp() * 1_000_000)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="-", help="Output JSONL file ('-' = stdout, the default).")
    parser.add_argument("--snapshot", default="", help="Only the records frozen in this snapshot.")
    parser.add_argument("--split", choices=["train", "eval"], default="", help="With --snapshot: one split.")
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=["prompt", "demonstration", "comparison", "rating"],
        help="Record kind to export (repeatable; default: all).",
    )
    parser.add_argument("--labeler-id", action="append", default=[], help="Only these labelers (repeatable).")
    parser.add_argument("--created-after", help="ISO time: records created at or after it.")
    parser.add_argument("--created-before", help="ISO time: records created before it.")
    parser.add_argument("--limit", type=int, default=0, help="Stop after this many records (0 = all).")
    _add_connection_arguments(parser)


def _run_export(args: argparse.Namespace) -> int:
    import grpc

    from rlhf.core.errors import ServiceError
    from rlhf.feedback import jsonl
    from rlhf.feedback.records import make_export_request

    request = make_export_request(
        snapshot=args.snapshot,
        split=args.split,
        kinds=args.kind,
        labeler_ids=args.labeler_id,
        created_after_us=_time_us(args.created_after),
        created_before_us=_time_us(args.created_before),
        limit=args.limit,
    )
    try:
        with _sink(args) as source, contextlib.ExitStack() as stack:
            out = (
                sys.stdout if args.out == "-" else stack.enter_context(open(args.out, "w", encoding="utf-8"))
            )
            n = jsonl.write_jsonl(source.export(request), out)
    except ServiceError as exc:
        print(f"export: {exc.message}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"export: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) else 1
    print(f"exported {n} records to {args.out}", file=sys.stderr)
    return 0


IMPORT = Command(
    help="Import a JSONL file (prompt/chosen/rejected, prompt/completion, messages, ratings) into the store.",
    add_arguments=_import_arguments,
    run=_run_import,
    description="Import JSONL in the Hugging Face / TRL formats. Every line is parsed first (a bad line "
    "writes nothing and is named), then written in atomic, idempotent batches: re-running an import creates "
    "no duplicates.",
)
EXPORT = Command(
    help="Export records (optionally one snapshot split) as JSONL in the Hugging Face / TRL formats.",
    add_arguments=_export_arguments,
    run=_run_export,
)
