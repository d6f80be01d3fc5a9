"""``rlhf serve reward`` and ``rlhf reward score`` (light module: no torch until a command runs).

``rlhf reward score --input pairs.jsonl --output scores.jsonl`` reads one JSON object per line:

- ``{"prompt": ..., "response": "..."}`` (or ``"completion"``, the TRL prompt-completion format); the prompt is
  a string or chat messages, a completion may be ``[{"role": "assistant", "content": ...}]``;
- ``{"messages": [...]}``: a conversation ending with the assistant's turn;
- ``{"prompt": ..., "chosen": ..., "rejected": ...}``: a preference pair; both responses are scored.

Each output line is the input object plus ``score`` (``chosen_score`` / ``rejected_score`` for preference
lines), ``normalized_score`` when the model carries training statistics, and ``model_version``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from rlhf.cli import Command, config_command
from rlhf.reward.config import RewardConfig


def _serve(config: RewardConfig) -> int:
    from rlhf.reward.server import serve

    return serve(config)


SERVE = config_command(
    "Run the reward scoring gRPC server (rlhf.v1.RewardService).",
    RewardConfig,
    _serve,
    description="Run the reward scoring server on a reward-model checkpoint: micro-batched scoring of <prompt, response> pairs across "
    "concurrent callers, hot swap with LoadModel, bearer-token auth (--auth-token-file or RLHF_AUTH_TOKEN) and "
    "TLS (--tls-cert-file/--tls-key-file).",
)


class LineError(ValueError):
    pass


def _response_text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        if value[-1].get("role") == "assistant" and isinstance(value[-1].get("content"), str):
            return value[-1]["content"]
    raise LineError(f"{where}: expected a string or [{{'role': 'assistant', 'content': ...}}]")


def items_of_line(record: dict, where: str) -> list[tuple[str, object]]:
    """(output key, item for RewardClient.make_item) for each thing to score on one JSONL line."""
    if not isinstance(record, dict):
        raise LineError(f"{where}: expected a JSON object")
    if "messages" in record:
        return [("score", list(record["messages"]))]
    if "prompt" not in record:
        raise LineError(
            f"{where}: needs 'prompt' with 'response'/'completion'/'chosen'+'rejected', or 'messages'"
        )
    prompt = record["prompt"]
    if not isinstance(prompt, (str, list)):
        raise LineError(f"{where}.prompt: expected a string or chat messages")
    if "chosen" in record and "rejected" in record:
        return [
            ("chosen_score", (prompt, _response_text(record["chosen"], f"{where}.chosen"))),
            ("rejected_score", (prompt, _response_text(record["rejected"], f"{where}.rejected"))),
        ]
    for key in ("response", "completion"):
        if key in record:
            return [("score", (prompt, _response_text(record[key], f"{where}.{key}")))]
    raise LineError(f"{where}: needs 'response', 'completion' or 'chosen'+'rejected' next to 'prompt'")


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL file of pairs to score ('-' = stdin).")
    parser.add_argument("--output", default="-", help="JSONL file to write ('-' = stdout, the default).")
    parser.add_argument(
        "--target",
        default=os.environ.get("RLHF_REWARD_TARGET", "127.0.0.1:50052"),
        metavar="HOST:PORT",
        help="Reward server (default: $RLHF_REWARD_TARGET or 127.0.0.1:50052).",
    )
    parser.add_argument("--token", default=None, help="Bearer token (default: $RLHF_AUTH_TOKEN).")
    parser.add_argument("--token-file", help="File whose first line is the bearer token.")
    parser.add_argument(
        "--tls", action="store_true", help="Connect with TLS (system roots or --tls-ca-file)."
    )
    parser.add_argument("--tls-ca-file", help="CA certificate for a TLS server.")
    parser.add_argument("--batch-size", type=int, default=64, help="Pairs per request (default 64).")
    parser.add_argument("--timeout", type=float, default=60.0, help="Deadline of each request, seconds.")
    parser.add_argument(
        "--retry-timeout",
        type=float,
        default=120.0,
        help="Seconds to keep retrying while the server is unavailable (default 120).",
    )
    parser.add_argument(
        "--truncation",
        choices=["reject", "truncate_left"],
        default=None,
        help="Policy for pairs longer than the model's limit (default: the server's).",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return args.token
    if args.token_file:
        lines = [ln.strip() for ln in Path(args.token_file).read_text().splitlines() if ln.strip()]
        return lines[0] if lines else None
    return os.environ.get("RLHF_AUTH_TOKEN") or None


def _read_lines(f, name: str) -> list[tuple[dict, list]]:
    parsed = []
    for n, line in enumerate(f, start=1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LineError(f"{where}: not JSON ({exc})") from None
        parsed.append((record, items_of_line(record, where)))
    return parsed


def _run_score(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from rlhf.core.client import RetryPolicy
    from rlhf.reward.client import RewardClient, make_item

    if args.batch_size < 1:
        print("--batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            f = sys.stdin if args.input == "-" else stack.enter_context(open(args.input, encoding="utf-8"))
            lines = _read_lines(f, args.input)
            for _record, items in lines:
                for _, item in items:
                    make_item(item)  # shape errors before anything is sent
    except (LineError, KeyError, TypeError) as exc:
        print(f"{args.input}: {exc}", file=sys.stderr)
        return 2
    flat = [(line_no, key, item) for line_no, (_, items) in enumerate(lines) for key, item in items]
    retry = RetryPolicy(retry_timeout=args.retry_timeout)
    written = 0
    try:
        with (
            RewardClient(
                args.target,
                token=_token(args),
                timeout=args.timeout,
                retry=retry,
                tls=args.tls,
                tls_ca_file=args.tls_ca_file,
            ) as client,
            contextlib.ExitStack() as stack,
        ):
            out = (
                sys.stdout
                if args.output == "-"
                else stack.enter_context(open(args.output, "w", encoding="utf-8"))
            )
            bar = stack.enter_context(
                tqdm(total=len(flat), unit="pair", desc="scoring", disable=args.no_progress, file=sys.stderr)
            )
            results: dict[int, dict] = {}
            next_line = 0
            for start in range(0, len(flat), args.batch_size):
                chunk = flat[start : start + args.batch_size]
                response = client.score_detailed([item for _, _, item in chunk], truncation=args.truncation)
                for (line_no, key, _), result in zip(chunk, response.results, strict=True):
                    fields = results.setdefault(line_no, {})
                    fields[key] = result.score
                    if result.HasField("normalized_score"):
                        fields["normalized_" + key] = result.normalized_score
                    if result.truncated:
                        fields["truncated"] = True
                    fields["model_version"] = response.model_version
                bar.update(len(chunk))
                # write every line whose items are all scored, in input order
                while (
                    next_line < len(lines)
                    and len(results.get(next_line, {}))
                    and all(key in results[next_line] for key, _ in lines[next_line][1])
                ):
                    record = {**lines[next_line][0], **results.pop(next_line)}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    next_line += 1
                    written += 1
    except grpc.RpcError as exc:
        print(f"{args.input}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    print(f"scored {len(flat)} pairs from {written} lines of {args.input} -> {args.output}", file=sys.stderr)
    return 0


SCORE = Command(
    help="Score a JSONL file of <prompt, response> pairs with a running reward server.",
    add_arguments=_score_arguments,
    run=_run_score,
    description="Score a JSONL file with a running reward server. " + __doc__.split("\n\n", 1)[1],
)
