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


def _up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--docker",
        action="store_true",
        required=True,
        help="Run on the Docker engine of $DOCKER_HOST (the only runtime `up` has; a cluster takes helm install).",
    )
    for flag, kwargs in (
        (
            ("-f", "--values"),
            {"action": "append", "default": [], "metavar": "FILE", "help": "Chart values file."},
        ),
        (
            ("--set",),
            {"action": "append", "default": [], "metavar": "KEY=VALUE", "help": "Chart value override."},
        ),
        (("--release",), {"default": "rlhf", "help": "Release name (default rlhf)."}),
        (("-n", "--namespace"), {"default": "default", "help": "Namespace in the Services' DNS names."}),
        (("--chart",), {"help": "Chart folder (default: $RLHF_CHART or the checkout's charts/rlhf)."}),
    ):
        parser.add_argument(*flag, **kwargs)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _up(args: argparse.Namespace) -> int:
    """Render the chart, run its service pods as containers, wait for their probes, serve until Ctrl-C."""
    import signal

    from rlhf.k8s import jobs
    from rlhf.k8s.docker import DockerCluster, pods_from_manifests, rendered_objects

    values = jobs.load_values(args.values, args.set)
    objects = rendered_objects(values, release=args.release, namespace=args.namespace, chart_dir=args.chart)
    cluster = DockerCluster(objects, namespace=args.namespace, prefix=f"{args.release}-docker")
    for sig in (
        signal.SIGINT,
        signal.SIGTERM,
    ):  # explicitly: a shell's background job starts with SIGINT ignored
        signal.signal(sig, _interrupt)
    try:
        services = [p for p in pods_from_manifests(objects) if p.kind in ("StatefulSet", "Deployment")]
        for pod in sorted(services, key=lambda p: p.kind != "StatefulSet"):  # the database first
            cluster.start_pod(pod)
            cluster.wait_ready(pod)
            print(f"{pod.name}: ready at {cluster.address(pod)}", file=sys.stderr)
        print("all pods ready; Ctrl-C stops them (SIGTERM, the pods' grace periods)", file=sys.stderr)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for pod in pods_from_manifests(objects):
            cluster.terminate(pod)
        cluster.close()
    return 0


UP = Command(
    help="Run the chart's service pods as containers on a local Docker engine (try it without Kubernetes).",
    add_arguments=_up_arguments,
    run=_up,
    description="Render the chart with your values (-f/--set, as for helm install) and run every Deployment "
    "and StatefulSet as containers exactly as the pod specs say (image, env, users, read-only roots, volumes, "
    "init containers), on one Docker network where the Services' DNS names resolve; wait for their probes; "
    "stop them gracefully on Ctrl-C. Images must be on the engine (make images builds rlhf:cpu).",
)
