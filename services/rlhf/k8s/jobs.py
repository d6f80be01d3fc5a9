"""Trainer Jobs for Kubernetes, built from the Helm chart itself (one spec for ``helm install`` and ``rlhf k8s``).

:func:`build_submission` renders ``charts/rlhf`` offline with the real Helm engine (PyPI ``helm-python-sdk``)
with the user's values files and ``--set`` overrides and ``trainer.jobs.<kind>.enabled=true``, and takes from
it the trainer Job and that job's config file. The Job gets a fresh name and its own ConfigMap (so the config
submitted is the config the job runs, even when it differs from the installed release's), owned by the Job so
Kubernetes deletes it with the Job. :func:`submit` creates both through the ``kubernetes`` client and
:func:`follow` streams the pod logs until the Job completes or fails (following retries onto new pods).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import yaml

#: CLI job name -> the chart's values key under trainer.jobs.
JOB_KINDS = {"sft": "sft", "reward-model": "rewardModel", "ppo": "ppo"}
JOB_KIND_LABEL = "rlhf.dev/job-kind"
JOBS_TEMPLATE = "templates/trainer/jobs.yaml"
CONFIG_TEMPLATE = "templates/configmap.yaml"


#: What ``rlhf k8s`` needs beyond the platform (the ``k8s`` extra: helm-python-sdk; kubernetes is a main dependency).
INSTALL_HINT = "pip install 'rlhf-platform[k8s]'"


def helm_engine():
    try:
        import helm_python
    except ImportError as exc:  # the k8s extra; the services and trainers do not need it
        raise RuntimeError(
            f"rendering the chart needs the Helm engine (helm-python-sdk): {INSTALL_HINT}"
        ) from exc
    return helm_python


def _kubernetes():
    try:
        import kubernetes
    except ImportError as exc:
        raise RuntimeError(f"talking to the cluster needs the Kubernetes client: {INSTALL_HINT}") from exc
    return kubernetes


def default_chart_dir() -> Path:
    """``$RLHF_CHART`` (set in the images), else the chart next to the installed package (a source checkout)."""
    if os.environ.get("RLHF_CHART"):
        return Path(os.environ["RLHF_CHART"])
    return Path(__file__).resolve().parents[3] / "charts" / "rlhf"


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(values_files: Iterable[str | os.PathLike] = (), set_values: Iterable[str] = ()) -> dict:
    """Values as ``helm -f a.yaml -f b.yaml --set x=y`` would merge them (later wins)."""
    helm_python = helm_engine() if set_values else None

    values: dict[str, Any] = {}
    for path in values_files:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a values file must be a mapping")
        values = _deep_merge(values, data)
    for expression in set_values:
        values = _deep_merge(values, helm_python.parse_set_string(expression))
    return values


def _documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _rendered(manifests: dict[str, str], suffix: str) -> str:
    for path, text in manifests.items():
        if path.endswith(suffix):
            return text
    raise KeyError(f"the chart rendered no {suffix}")


def job_name(base: str, now: dt.datetime | None = None) -> str:
    """``base`` plus a UTC timestamp, within the 63 characters a Job name (and its pods' label) may have."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{base[: 63 - len(stamp) - 1].rstrip('-')}-{stamp}"


def build_submission(
    kind: str,
    *,
    values: dict | None = None,
    release: str = "rlhf",
    namespace: str = "default",
    chart_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> tuple[dict, dict]:
    """(Job, ConfigMap) for ``rlhf train <kind>`` exactly as the chart's trainer Job template renders them."""
    helm_python = helm_engine()

    if kind not in JOB_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(JOB_KINDS)}")
    values = copy.deepcopy(values or {})
    jobs = values.setdefault("trainer", {}).setdefault("jobs", {})
    jobs.setdefault(JOB_KINDS[kind], {})["enabled"] = True
    chart = helm_python.Chart.load(str(chart_dir or default_chart_dir()))
    chart.validate_schema(values)
    manifests = chart.render(values, name=release, namespace=namespace)

    found = [
        d
        for d in _documents(_rendered(manifests, JOBS_TEMPLATE))
        if d.get("kind") == "Job" and d["metadata"].get("labels", {}).get(JOB_KIND_LABEL) == kind
    ]
    if len(found) != 1:
        raise RuntimeError(f"the chart rendered {len(found)} Jobs for {kind}")
    job = found[0]
    release_config = _documents(_rendered(manifests, CONFIG_TEMPLATE))[0]
    config_key = f"trainer-{kind}.yaml"

    job["metadata"]["name"] = name or job_name(job["metadata"]["name"])
    job["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "rlhf-k8s"
    job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "rlhf-k8s"
    config_name = f"{job['metadata']['name'][:56].rstrip('-')}-config"
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_name,
            "namespace": namespace,
            "labels": dict(job["metadata"]["labels"]),
        },
        "data": {config_key: release_config["data"][config_key]},
    }
    for volume in job["spec"]["template"]["spec"]["volumes"]:
        if volume["name"] == "config":
            volume["configMap"]["name"] = config_name
    return job, configmap


# ---- talking to a cluster -------------------------------------------------------------------------------


def api_clients(kubeconfig: str | None = None, context: str | None = None):
    """(BatchV1Api, CoreV1Api) from the in-cluster service account or a kubeconfig."""
    _kubernetes()
    from kubernetes import client, config

    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=kubeconfig, context=context)
    return client.BatchV1Api(), client.CoreV1Api()


def submit(job: dict, configmap: dict, batch, core) -> dict:
    """Create the ConfigMap, then the Job, then make the Job own the ConfigMap (deleted with it)."""
    namespace = job["metadata"]["namespace"]
    core.create_namespaced_config_map(namespace, configmap)
    created = batch.create_namespaced_job(namespace, job)
    uid = created.metadata.uid
    owner = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": uid,
        "blockOwnerDeletion": False,
    }
    core.patch_namespaced_config_map(
        configmap["metadata"]["name"], namespace, {"metadata": {"ownerReferences": [owner]}}
    )
    return {"name": job["metadata"]["name"], "namespace": namespace, "uid": uid}


def _job_finished(status) -> str | None:
    """'Complete', 'Failed' or None from a V1JobStatus."""
    for condition in status.conditions or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type
    return None


def follow(
    name: str,
    namespace: str,
    batch,
    core,
    *,
    out: TextIO = sys.stdout,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
    container: str = "trainer",
) -> int:
    """Stream the logs of every pod of Job ``name`` (retries included) until it ends; 0 = Complete, 1 = Failed."""
    seen: set[str] = set()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = batch.read_namespaced_job(name, namespace)
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        pods.sort(key=lambda p: p.metadata.creation_timestamp or dt.datetime.min.replace(tzinfo=dt.UTC))
        for pod in pods:
            pod_name = pod.metadata.name
            if pod_name in seen or pod.status.phase == "Pending":
                continue
            seen.add(pod_name)
            print(f"--- pod {pod_name} ({pod.status.phase})", file=out, flush=True)
            stream = core.read_namespaced_pod_log(
                pod_name, namespace, container=container, follow=True, _preload_content=False
            )
            try:
                for chunk in stream.stream():
                    out.write(chunk.decode("utf-8", errors="replace"))
                    out.flush()
            finally:
                stream.release_conn()
        finished = _job_finished(job.status)
        if finished and all(p.metadata.name in seen for p in pods if p.status.phase != "Pending"):
            print(f"--- job {name}: {finished}", file=out, flush=True)
            return 0 if finished == "Complete" else 1
        if deadline is not None and time.monotonic() > deadline:
            print(
                f"--- job {name}: still running after {timeout:.0f}s; stopped following", file=out, flush=True
            )
            return 2
        time.sleep(poll_seconds)
