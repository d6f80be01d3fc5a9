"""``rlhf k8s submit``: Jobs rendered from the chart's own template, valid for Kubernetes, followed to the end."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from .conftest import CHART_DIR, find

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("helm_python")

from rlhf.k8s import jobs  # noqa: E402


@pytest.mark.parametrize("kind", list(jobs.JOB_KINDS))
def test_submitted_job_and_configmap_validate_against_kubernetes(kind):
    job, configmap = jobs.build_submission(kind, release="prod", namespace="ml", chart_dir=CHART_DIR)
    for version in ("1.30", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)
        kubernetes_validate.validate(configmap, version, strict=True)
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["name"].startswith(
        f"prod-rlhf-train-{kind}-"
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["train", kind]
    assert list(configmap["data"]) == [f"trainer-{kind}.yaml"]


def test_job_is_the_charts_job_template_with_its_own_name_and_config(render):
    values = {"trainer": {"jobs": {"ppo": {"enabled": True, "config": {"seed": 7}}}, "backoffLimit": 5}}
    (chart_job,) = find(render(values, name="prod"), "Job")
    job, configmap = jobs.build_submission(
        "ppo", values=values, release="prod", namespace="ml", chart_dir=CHART_DIR, name="ppo-run-1"
    )
    assert job["metadata"]["name"] == "ppo-run-1"
    # identical apart from the name, the managed-by label and the config map the pod mounts
    strip = yaml.safe_load(yaml.safe_dump(job))
    strip["metadata"]["name"] = chart_job["metadata"]["name"]
    for labels in (strip["metadata"]["labels"], strip["spec"]["template"]["metadata"]["labels"]):
        labels["app.kubernetes.io/managed-by"] = "Helm"
    for volume in strip["spec"]["template"]["spec"]["volumes"]:
        if volume["name"] == "config":
            assert volume["configMap"]["name"] == configmap["metadata"]["name"] == "ppo-run-1-config"
            volume["configMap"]["name"] = "prod-rlhf-config"
    assert strip == chart_job
    config = yaml.safe_load(configmap["data"]["trainer-ppo.yaml"])
    assert config["seed"] == 7
    assert config["generation_target"] == "dns:///prod-rlhf-generation-headless.ml.svc:50051"
    assert config["reward_target"] == "dns:///prod-rlhf-reward-headless.ml.svc:50052"
    assert config["feedback_target"] == "prod-rlhf-feedback.ml.svc:50053"


def test_values_files_and_set_overrides_merge_like_helm(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text(
        "gpu: {enabled: true}\ntrainer:\n  jobs:\n    sft:\n      config: {max_steps: 10, seed: 1}\n"
    )
    b = tmp_path / "b.yaml"
    b.write_text("trainer:\n  jobs:\n    sft:\n      config: {max_steps: 20}\n")
    values = jobs.load_values([a, b], ["trainer.jobs.sft.config.seed=3", "trainer.gpus=2"])
    assert values["trainer"]["jobs"]["sft"]["config"] == {"max_steps": 20, "seed": 3}
    job, configmap = jobs.build_submission("sft", values=values, namespace="ml", chart_dir=CHART_DIR)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert yaml.safe_load(configmap["data"]["trainer-sft.yaml"])["max_steps"] == 20


def test_bad_values_stop_the_submission_with_the_key_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "k8s", "submit", "sft", "--dry-run", "--set", "trainer.gpus=-1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "/trainer/gpus" in result.stderr, result.stderr


def test_dry_run_prints_the_configmap_and_job():
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "k8s", "submit", "reward-model", "--dry-run", "-n", "ml"],
        capture_output=True,
        text=True,
        check=True,
    )
    configmap, job = list(yaml.safe_load_all(result.stdout))
    assert (configmap["kind"], job["kind"]) == ("ConfigMap", "Job")
    kubernetes_validate.validate(job, "1.30", strict=True)


WITHOUT = """
import sys
sys.modules[{module!r}] = None  # as if the k8s extra were not installed: importing it raises ImportError
from rlhf.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("helm_python", ["k8s", "submit", "sft", "--dry-run"]),
        ("kubernetes", ["k8s", "submit", "sft", "--kubeconfig", "/nonexistent/kubeconfig"]),
    ],
)
def test_submit_without_the_k8s_extra_says_how_to_install_it(module, argv):
    code = WITHOUT.format(module=module, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "pip install 'rlhf-platform[k8s]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_k8s_extra_holds_what_rlhf_k8s_imports_and_dev_includes_it():
    """`rlhf k8s` (the Helm engine, the Kubernetes client, the Docker SDK for `k8s up --docker`) is the k8s
    extra, not the core install the services and trainers need; `make install` (dev) takes every extra."""
    import tomllib

    project = tomllib.loads((CHART_DIR.parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(extras["k8s"]) == {"helm-python-sdk", "kubernetes", "docker"}
    assert not set(extras["k8s"]) & set(project["dependencies"])
    assert "rlhf-platform[labeling,demo,k8s]" in extras["dev"]


class FakeStream:
    def __init__(self, text: str):
        self.text = text
        self.released = False

    def stream(self):
        for line in self.text.splitlines(keepends=True):
            yield line.encode()

    def release_conn(self):
        self.released = True


class FakeCluster:
    """A Job whose first pod fails, then a retry pod succeeds: states advance on every read of the Job."""

    def __init__(self):
        self.reads = 0
        self.streams: list[FakeStream] = []
        t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        self.pod_states = [
            # (reads after which the pod exists, name, created, phases by read)
            ("trainer-a", t0, ["Pending", "Running", "Failed", "Failed", "Failed", "Failed"]),
            (
                "trainer-b",
                t0 + dt.timedelta(seconds=5),
                [None, None, None, "Pending", "Running", "Succeeded"],
            ),
        ]

    def read_namespaced_job(self, name, namespace):
        self.reads += 1
        done = self.reads >= 6
        conditions = [SimpleNamespace(type="Complete", status="True")] if done else []
        return SimpleNamespace(status=SimpleNamespace(conditions=conditions))

    def list_namespaced_pod(self, namespace, label_selector):
        assert label_selector == "job-name=sft-1"
        items = []
        for name, created, phases in self.pod_states:
            phase = phases[min(self.reads, len(phases)) - 1]
            if phase is not None:
                items.append(
                    SimpleNamespace(
                        metadata=SimpleNamespace(name=name, creation_timestamp=created),
                        status=SimpleNamespace(phase=phase),
                    )
                )
        return SimpleNamespace(items=list(reversed(items)))

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        assert follow and not _preload_content and container == "trainer"
        s = FakeStream(f"{name}: step 1\n{name}: step 2\n")
        self.streams.append(s)
        return s


def test_follow_streams_every_pod_including_retries_and_reports_completion():
    cluster = FakeCluster()
    out = io.StringIO()
    code = jobs.follow("sft-1", "ml", cluster, cluster, out=out, poll_seconds=0)
    text = out.getvalue()
    assert code == 0
    assert text.index("trainer-a: step 2") < text.index("--- pod trainer-b") < text.index("trainer-b: step 2")
    assert text.rstrip().endswith("--- job sft-1: Complete")
    assert len(cluster.streams) == 2 and all(s.released for s in cluster.streams)


def test_follow_returns_1_when_the_job_fails():
    cluster = FakeCluster()
    cluster.read_namespaced_job = lambda name, ns: SimpleNamespace(
        status=SimpleNamespace(conditions=[SimpleNamespace(type="Failed", status="True")])
    )
    cluster.reads = 3
    cluster.pod_states = cluster.pod_states[:1]
    out = io.StringIO()
    assert jobs.follow("sft-1", "ml", cluster, cluster, out=out, poll_seconds=0) == 1
    assert out.getvalue().rstrip().endswith("--- job sft-1: Failed")


def test_submit_makes_the_job_own_its_configmap():
    calls = []

    class Api:
        def create_namespaced_config_map(self, ns, body):
            calls.append(("cm", ns, body["metadata"]["name"]))

        def create_namespaced_job(self, ns, body):
            calls.append(("job", ns, body["metadata"]["name"]))
            return SimpleNamespace(metadata=SimpleNamespace(uid="uid-1"))

        def patch_namespaced_config_map(self, name, ns, body):
            calls.append(("patch", name, body["metadata"]["ownerReferences"][0]["uid"]))

    job, configmap = jobs.build_submission("sft", namespace="ml", chart_dir=CHART_DIR, name="sft-1")
    api = Api()
    created = jobs.submit(job, configmap, api, api)
    assert created == {"name": "sft-1", "namespace": "ml", "uid": "uid-1"}
    assert calls == [("cm", "ml", "sft-1-config"), ("job", "ml", "sft-1"), ("patch", "sft-1-config", "uid-1")]
