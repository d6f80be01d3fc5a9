"""The chart's pods run for real: the CPU image built, and every Deployment / StatefulSet / Job / helm-test Pod of
the rendered chart run as containers exactly as its pod spec says (rlhf.k8s.docker), on a real Docker engine.

Fails when an image does not build, a probe never passes within the chart's timing, a container exits non-zero,
a trainer Job writes no checkpoint, or a SIGTERM is not drained within the grace period. The engine (Debian's
dockerd), the base image (debootstrap) and the image layers are cached under ~/.cache/rlhf-docker: a fresh
machine pays once (~7 min), later runs only rebuild the layer with the project's code.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rlhf.core.models import make_tiny_causal_lm, make_tiny_reward_model
from rlhf.feedback import records as rec
from rlhf.feedback.client import FeedbackClient
from rlhf.generation.client import PolicyClient

from .conftest import REPO

docker = pytest.importorskip("docker")
from rlhf.k8s.docker import DockerCluster, pods_from_manifests, rendered_objects  # noqa: E402

# A fresh machine builds the base and the images in the first test's fixture (~8 min): more than the default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(1800)]

ENGINE = REPO / "deploy" / "docker" / "local-engine.sh"
NAMESPACE = "rlhf-test"
SFT = {"model": "/models/tiny-lm", "snapshot": "demos-v1", "max_steps": 2, "batch_size": 4, "max_length": 64}
PPO = {
    "snapshot": "demos-v1",
    "max_steps": 1,
    "batch_size": 4,
    "micro_batch_size": 4,
    "response_length": 6,
    "reference_model": "/models/tiny-lm",
}
VALUES = {
    "image": {"repository": "rlhf", "tag": "cpu", "flavor": "none", "pullPolicy": "Never"},
    "postgresql": {"image": "local/postgres:15-bookworm", "pullPolicy": "Never"},
    "models": {"volumeType": "persistentVolumeClaim", "init": {"enabled": False}},
    "generation": {"model": "/models/tiny-lm", "replicas": 2},
    "reward": {"model": "/models/tiny-rm"},
    "trainer": {"jobs": {"sft": {"enabled": True, "config": SFT}, "ppo": {"enabled": True, "config": PPO}}},
}


def _engine_answers(env) -> bool:
    return subprocess.run(["docker", "version"], env=env, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def engine():
    """A Docker engine with rlhf:cpu and local/postgres built from this checkout; stopped if started here."""
    if shutil.which("docker") is None or (
        shutil.which("dockerd") is None and not _engine_answers(os.environ)
    ):
        if os.environ.get("CI"):
            pytest.fail("CI must run the container tests: install docker.io (make install does, as root)")
        pytest.skip("no Docker engine: apt-get install docker.io iptables debootstrap (make install does)")
    env = dict(os.environ)
    started_here = not _engine_answers(env)
    start = subprocess.run([str(ENGINE), "start"], env=env, capture_output=True, text=True)
    assert start.returncode == 0, start.stderr
    env["DOCKER_HOST"] = start.stdout.strip().split("=", 1)[1]
    for step in ("base", "build"):
        result = subprocess.run([str(ENGINE), step], env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{step}: {result.stdout}\n{result.stderr}"
        print(result.stdout)
    client = docker.DockerClient(base_url=env["DOCKER_HOST"])
    client.docker_host = env["DOCKER_HOST"]  # for commands the tests run in other processes
    yield client
    if started_here:
        subprocess.run([str(ENGINE), "stop"], env=env, check=True)


@pytest.fixture(scope="module")
def cluster(engine, tmp_path_factory):
    objects = rendered_objects(VALUES, release="rlhf", namespace=NAMESPACE)
    volumes_before = {v.name for v in engine.volumes.list()}
    cluster = DockerCluster(objects, namespace=NAMESPACE, prefix="rlhf-test", client=engine)
    try:
        models = tmp_path_factory.mktemp("models")
        cluster.put_folder("rlhf-models", make_tiny_causal_lm(models / "tiny-lm"), "tiny-lm", fs_group=10001)
        cluster.put_folder(
            "rlhf-models", make_tiny_reward_model(models / "tiny-rm"), "tiny-rm", fs_group=10001
        )
        yield cluster
    finally:
        cluster.close()
        left = engine.containers.list(all=True, filters={"label": "rlhf.k8s/cluster=rlhf-test"})
        assert not left, f"containers left behind: {[c.name for c in left]}"
        new_volumes = {v.name for v in engine.volumes.list()} - volumes_before
        assert not new_volumes, f"volumes left behind: {sorted(new_volumes)}"


def _pods(cluster, kind: str | None = None, suffix: str = ""):
    pods = pods_from_manifests(cluster.objects)
    return [p for p in pods if (kind is None or p.kind == kind) and p.name.endswith(suffix)]


def _token(cluster) -> str:
    secret = cluster.by_kind[("Secret", "rlhf-auth")]
    return base64.b64decode(secret["data"]["token"]).decode()


def test_every_service_pod_starts_and_passes_its_probes_within_the_charts_timing(cluster):
    """PostgreSQL first (the feedback store's migrations need it), then feedback, generation and reward."""
    order = ["rlhf-postgresql-0", "rlhf-feedback", "rlhf-generation-0", "rlhf-generation-1", "rlhf-reward"]
    pods = {p.name: p for p in _pods(cluster) if p.kind in ("Deployment", "StatefulSet")}
    assert sorted(pods) == sorted(order)
    for name in order:
        cluster.start_pod(pods[name])
        took = cluster.wait_ready(pods[name])
        assert took, f"{name}: the chart gives it no probe"
        print(name, {k: round(v, 1) for k, v in took.items()})


def test_the_helm_test_pod_succeeds_against_the_running_services(cluster):
    (smoke,) = _pods(cluster, "Pod")
    cluster.start_pod(smoke)
    assert cluster.wait_exit(smoke, timeout=300) == [0], cluster.logs(smoke)


def test_sft_and_ppo_jobs_train_through_the_services_and_write_checkpoints_to_the_claim(cluster):
    (feedback,) = _pods(cluster, "Deployment", "feedback")
    target = f"{cluster.address(feedback)}:50053"
    with FeedbackClient(target, token=_token(cluster)) as client:
        client.add_demonstrations(
            [
                rec.make_demonstration(f"Say something kind #{i}", "You are great.", idempotency_key=f"d{i}")
                for i in range(12)
            ]
        )
        client.create_snapshot("demos-v1", eval_fraction=0.25, seed=0)
    for kind in ("sft", "ppo"):
        (job,) = _pods(cluster, "Job", f"train-{kind}")
        cluster.start_pod(job)
        assert cluster.wait_exit(job, timeout=900) == [0], cluster.logs(job, tail=80)
        config = cluster.read_file("rlhf-checkpoints", f"{kind}/final/config.json")
        assert config is not None, f"{kind}: no final checkpoint on the claim\n{cluster.logs(job)}"
        assert json.loads(config)["model_type"] == "llama"
    # PPO reached both generation replicas through the headless Service and pushed its weights to each
    versions = []
    for pod in _pods(cluster, "Deployment", "generation-0") + _pods(cluster, "Deployment", "generation-1"):
        with PolicyClient(f"{cluster.address(pod)}:50051", token=_token(cluster)) as client:
            versions.append(int(client.model_info().version))
    assert len(versions) == 2 and versions[0] == versions[1] > 0, versions


def test_every_container_drains_on_sigterm_within_the_grace_period(cluster):
    for pod in _pods(cluster):
        if pod.name not in cluster.containers or pod.kind in ("Job", "Pod"):
            continue
        for code, seconds in cluster.terminate(pod):
            assert code == 0, f"{pod.name} exited {code} on SIGTERM\n{cluster.logs(pod)}"
            assert seconds < pod.grace_seconds, f"{pod.name} took {seconds:.1f}s (grace {pod.grace_seconds}s)"


def test_rlhf_k8s_up_docker_runs_the_charts_pods_until_ctrl_c_and_leaves_nothing_behind(engine, tmp_path):
    """What a user with Docker runs to try the platform without Kubernetes (the same runner as above)."""
    sets = [
        "image.repository=rlhf,image.tag=cpu,image.flavor=none",
        "postgresql.image=local/postgres:15-bookworm",
        "models.init.enabled=false,generation.enabled=false,generation.model=/models/unused",
    ]
    env = {**os.environ, "DOCKER_HOST": engine.docker_host}
    volumes_before = {v.name for v in engine.volumes.list()}
    argv = [sys.executable, "-m", "rlhf.cli", "k8s", "up", "--docker", "--release", "rlhf-up"]
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:  # a file, not a pipe: the command's output never blocks it
        proc = subprocess.Popen([*argv, *[a for s in sets for a in ("--set", s)]], env=env, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while "all pods ready" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        assert "rlhf-up-reward: ready" in log_path.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            for container in engine.containers.list(
                all=True, filters={"label": "rlhf.k8s/cluster=rlhf-up-docker"}
            ):
                container.remove(force=True, v=True)
            for volume in engine.volumes.list(filters={"name": "rlhf-up-docker-"}):
                volume.remove(force=True)
            for network in engine.networks.list(names=["rlhf-up-docker-net"]):
                network.remove()
    assert not engine.containers.list(all=True, filters={"label": "rlhf.k8s/cluster=rlhf-up-docker"})
    assert {v.name for v in engine.volumes.list()} <= volumes_before


def test_the_cuda_image_builds_up_to_its_cuda_packages(engine):
    """Dockerfile.cuda's first stage (every locked package but torch, triton and nvidia-*) builds and imports."""
    out = engine.containers.run(
        "rlhf:cuda-deps",
        ["python", "-c", "import grpc, transformers, sqlalchemy, prometheus_client; print('ok')"],
        remove=True,
    )
    assert out.decode().strip() == "ok"
    probe = engine.containers.run("rlhf:cuda-deps", ["pip", "show", "-q", "torch"], detach=True)
    try:
        assert probe.wait(timeout=60)["StatusCode"] != 0  # torch (CUDA) comes in the next stage
    finally:
        probe.remove(v=True)
