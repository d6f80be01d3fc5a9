"""The smoke check the chart's ``helm test`` pod runs: every service SERVING, then one real Score call.

    python -m rlhf.k8s.smoke --health rlhf-feedback.ml.svc:50053 --health ... \
        --score rlhf-reward.ml.svc:50052 --prompt "..." --response "..."

The bearer token comes from ``$RLHF_AUTH_TOKEN`` (the chart injects it from its Secret). Exit code 0 when every
check passed, 1 otherwise; one line per check on stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.core.client import RetryPolicy, make_channel
from rlhf.reward.client import RewardClient


def check_health(target: str, token: str | None, timeout: float) -> str:
    """'SERVING' or the reason it is not (the standard grpc.health.v1 service, overall status)."""
    with make_channel(target, token=token) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)


def check_score(
    target: str, token: str | None, prompt: str, response: str, timeout: float
) -> tuple[bool, str]:
    """Score one pair; ok when the server returns exactly one finite score."""
    with RewardClient(
        target, token=token, timeout=timeout, retry=RetryPolicy(retry_timeout=timeout)
    ) as client:
        try:
            reply = client.score_detailed([(prompt, response)])
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    if len(reply.results) != 1 or not math.isfinite(reply.results[0].score):
        return False, f"expected one finite score, got {list(reply.results)}"
    return True, f"score {reply.results[0].score:.4f} (model {reply.model_version or '?'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.k8s.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--health", action="append", default=[], metavar="HOST:PORT", help="Must be SERVING.")
    parser.add_argument("--score", metavar="HOST:PORT", help="A reward service to make one Score call to.")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--response", default="The capital of France is Paris.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds per check (default 60).")
    parser.add_argument(
        "--token", default=os.environ.get("RLHF_AUTH_TOKEN"), help="Default: $RLHF_AUTH_TOKEN."
    )
    args = parser.parse_args(argv)
    failed = 0
    for target in args.health:
        status = check_health(target, args.token, args.timeout)
        ok = status == "SERVING"
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} health {target}: {status}", flush=True)
    if args.score:
        ok, detail = check_score(args.score, args.token, args.prompt, args.response, args.timeout)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} Score {args.score}: {detail}", flush=True)
    if not args.health and not args.score:
        parser.error("nothing to check: give --health and/or --score")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
