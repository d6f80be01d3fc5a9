"""``rlhf k8s submit``: a trainer Job rendered from the Helm chart, submitted, followed (light module)."""

from __future__ import annotations

import argparse
import os
import sys

from rlhf.cli import Command


def _arguments(parser: argparse.ArgumentParser) -> None:
    from rlhf.k8s.jobs import JOB_KINDS

    parser.add_argument("kind", choices=list(JOB_KINDS), help="Trainer job to run.")
    parser.add_argument(
        "-f",
        "--values",
        action="append",
        default=[],
        metavar="FILE",
        help="Chart values file, as given to helm install (repeatable; later files win).",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Chart value override in helm's --set syntax, e.g. trainer.jobs.sft.config.max_steps=100.",
    )
    parser.add_argument("--release", default="rlhf", help="Helm release the Job belongs to (default rlhf).")
    parser.add_argument(
        "-n",
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="Namespace of the release (default: $POD_NAMESPACE or 'default').",
    )
    parser.add_argument(
        "--chart", help="Chart folder (default: $RLHF_CHART or the source checkout's charts/rlhf)."
    )
    parser.add_argument("--name", help="Job name (default: the chart's name plus a UTC timestamp).")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else ~/.kube/config).")
    parser.add_argument("--context", help="kubeconfig context.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the Job and its ConfigMap as YAML; submit nothing."
    )
    parser.add_argument("--no-follow", action="store_true", help="Submit and return without streaming logs.")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="Stop following after this many seconds (the Job keeps running).",
    )


def _run(args: argparse.Namespace) -> int:
    import yaml

    from rlhf.k8s import jobs

    try:
        values = jobs.load_values(args.values, args.set)
        job, configmap = jobs.build_submission(
            args.kind,
            values=values,
            release=args.release,
            namespace=args.namespace,
            chart_dir=args.chart,
            name=args.name,
        )
    except Exception as exc:  # schema violations, template failures, unreadable files: say which
        print(f"rlhf k8s submit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        yaml.safe_dump_all([configmap, job], sys.stdout, sort_keys=False)
        return 0
    try:
        batch, core = jobs.api_clients(args.kubeconfig, args.context)
    except RuntimeError as exc:  # the k8s extra is not installed
        print(f"rlhf k8s submit: {exc}", file=sys.stderr)
        return 2
    from kubernetes.client.exceptions import ApiException

    try:
        created = jobs.submit(job, configmap, batch, core)
    except ApiException as exc:
        print(
            f"rlhf k8s submit: the API server refused: {exc.status} {exc.reason}: {exc.body}", file=sys.stderr
        )
        return 1
    print(f"job {created['namespace']}/{created['name']} created", file=sys.stderr)
    if args.no_follow:
        return 0
    return jobs.follow(created["name"], created["namespace"], batch, core, timeout=args.timeout)


SUBMIT = Command(
    help="Submit a trainer Job (sft, reward-model, ppo) built from the Helm chart, follow it and stream its logs.",
    add_arguments=_arguments,
    run=_run,
    description="Render the chart's trainer Job for KIND with your values (-f/--set, as for helm install), "
    "submit it with its own ConfigMap to the release's namespace, then stream the pod logs until the Job "
    "completes (exit 0) or fails (exit 1). The Job reaches the release's Services by their DNS names and "
    "writes checkpoints to the release's checkpoint claim.",
)
