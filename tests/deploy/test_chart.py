"""The Helm chart renders offline with the real Helm engine, validates against Kubernetes 1.30+ and lints clean."""

from __future__ import annotations

import base64
import copy
import importlib
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import CHART_DIR, DEPLOY_DIR, find

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
CRD_GROUPS = ("monitoring.coreos.com/",)

EXTERNAL_DB = {
    "postgresql": {"enabled": False},
    "feedback": {"database": {"existingSecret": "feedback-db", "secretKey": "DATABASE_URL"}},
}
MONITORING = {
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "dashboards": {"enabled": True},
    }
}
ALL_JOBS = {"trainer": {"jobs": {k: {"enabled": True} for k in ("sft", "rewardModel", "ppo")}}}


def merged(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        stack = [(out, part)]
        while stack:
            dst, src = stack.pop()
            for k, v in src.items():
                if isinstance(v, dict) and isinstance(dst.get(k), dict):
                    stack.append((dst[k], v))
                else:
                    dst[k] = copy.deepcopy(v)
    return out


MATRIX = {
    f"gpu={gpu},db={db},monitoring={mon}": merged(
        {"gpu": {"enabled": gpu}},
        EXTERNAL_DB if db == "external" else {},
        MONITORING if mon else {},
        ALL_JOBS,
    )
    for gpu, db, mon in itertools.product([False, True], ["bundled", "external"], [False, True])
}
MATRIX["defaults"] = {}
MATRIX["hpa+pvc-models+existing-auth"] = {
    "reward": {"autoscaling": {"enabled": True}},
    "models": {"volumeType": "persistentVolumeClaim"},
    "auth": {"existingSecret": "my-token"},
    "trainer": {"checkpoints": {"existingClaim": "ckpts"}, "activeDeadlineSeconds": 86400},
}
MATRIX["labeling+reward-model-set"] = {
    "feedback": {"labeling": {"enabled": True, "tokensSecret": "labelers", "admins": ["ann"]}},
    "reward": {"model": "/checkpoints/reward-model/final"},
}
MATRIX["auth-off,init-off"] = {
    "auth": {"enabled": False},
    "models": {"init": {"enabled": False}, "volumeType": "persistentVolumeClaim", "existingClaim": "weights"},
}


def validate_core(objects) -> list[str]:
    """kubernetes-validate every core object for each version; returns the CRD kinds it skipped."""
    skipped = []
    for path, obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            skipped.append(obj["kind"])
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{path}: {obj['kind']} {obj['metadata']['name']} invalid for {version}: {exc.message}"
                )
    return skipped


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_rendered_object_validates_against_kubernetes_schemas(render, case):
    objects = render(MATRIX[case])
    skipped = validate_core(objects)
    assert set(skipped) <= {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    kinds = {o["kind"] for _, o in objects}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Pod"} <= kinds


def test_lint_is_clean_in_strict_mode():
    for values in (None, MATRIX["gpu=True,db=external,monitoring=True"]):
        report = helm_python.lint(str(CHART_DIR), values, strict=True, kube_version="v1.30.0")
        assert report["messages"] == [] and report["errors"] == [], report


def test_values_yaml_documents_every_key():
    """Every leaf of values.yaml has a comment right above it (or above the key it belongs to, for resources)."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def commented(i: int) -> bool:
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        return j >= 0 and lines[j].lstrip().startswith("#")

    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        if stripped.endswith(":") and i + 1 < len(lines) and indent(lines[i + 1]) > indent(line):
            continue  # a section; its leaves carry the comments
        if commented(i):
            continue
        ancestors, level = [], indent(line)
        for j in range(i - 1, -1, -1):
            if lines[j].strip() and not lines[j].lstrip().startswith("#") and indent(lines[j]) < level:
                ancestors.append(j)
                level = indent(lines[j])
        # documented by the comment on the block it belongs to (resources, securityContext), or a list item's field
        if any(commented(j) or lines[j].strip().startswith("-") for j in ancestors):
            continue
        undocumented.append(f"line {i + 1}: {stripped}")
    assert undocumented == []


def test_gpu_on_requests_nvidia_gpus_tolerates_the_taint_and_uses_the_cuda_image(render):
    objects = render({"gpu": {"enabled": True, "nodeSelector": {"gpu": "a100"}}, **ALL_JOBS})
    for name in ("generation", "reward"):
        (dep,) = find(objects, "Deployment", f"-{name}")
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith("-cuda")
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"gpu": "a100"}
    (feedback,) = find(objects, "Deployment", "-feedback")
    fpod = feedback["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(fpod) and fpod["containers"][0]["image"].endswith("-cpu")
    for job in find(objects, "Job"):
        assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_gpu_off_requests_no_gpus_and_uses_the_cpu_image(render):
    objects = render(ALL_JOBS)
    assert "nvidia.com/gpu" not in json.dumps([o for _, o in objects])
    for dep in find(objects, "Deployment"):
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0-cpu")


def test_services_have_native_grpc_probes_on_the_health_service_and_run_as_non_root(render):
    objects = render(ALL_JOBS)
    for dep in find(objects, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        c = spec["containers"][0]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (dep["metadata"]["name"], probe)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert c["args"][:2] == ["serve", dep["metadata"]["labels"]["app.kubernetes.io/component"]]
    for job in find(objects, "Job"):
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert c["securityContext"]["runAsNonRoot"] if "runAsNonRoot" in c["securityContext"] else True
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_every_deployment_has_a_pdb_a_grpc_service_and_metrics_on_a_cluster_internal_service(render):
    objects = render({"reward": {"serviceType": "LoadBalancer"}})
    for dep in find(objects, "Deployment"):
        name = dep["metadata"]["name"]
        (pdb,) = find(objects, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        (svc,) = find(objects, "Service", name)
        assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc"}  # exposing the API exposes no metrics
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        (metrics,) = find(objects, "Service", f"{name}-metrics")
        assert metrics["spec"]["type"] == "ClusterIP" and [p["name"] for p in metrics["spec"]["ports"]] == [
            "metrics"
        ]
        assert metrics["metadata"]["labels"]["rlhf.dev/metrics"] == "true"
        assert metrics["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_network_policies_deny_by_default_and_open_only_what_each_caller_needs(render):
    objects = render({"feedback": {"labeling": {"enabled": True}}})
    policies = {p["metadata"]["name"]: p["spec"] for p in find(objects, "NetworkPolicy")}
    deny = policies["rlhf-default-deny"]
    assert (
        deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/instance": "rlhf"}}
        and "ingress" not in deny
    )

    def rules(name):
        return {r["ports"][0]["port"]: r.get("from") for r in policies[name]["ingress"]}

    trainer_and_test = [
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/instance": "rlhf", "app.kubernetes.io/component": c}
            }
        }
        for c in ("trainer", "test")
    ]
    assert rules("rlhf-generation") == {50051: trainer_and_test, 9091: [{"namespaceSelector": {}}]}
    assert rules("rlhf-feedback") == {50053: trainer_and_test, 8080: None, 9093: [{"namespaceSelector": {}}]}
    assert rules("rlhf-reward") == {50052: None, 9092: [{"namespaceSelector": {}}]}  # the public API
    (pg,) = policies["rlhf-postgresql"]["ingress"]
    assert pg["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "feedback"
    narrowed = render({"networkPolicy": {"publicFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}})
    reward = next(p for p in find(narrowed, "NetworkPolicy", "rlhf-reward"))
    assert reward["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_reward_hpa_is_optional_and_replaces_the_replica_count(render):
    assert not find(render(), "HorizontalPodAutoscaler")
    objects = render({"reward": {"autoscaling": {"enabled": True, "maxReplicas": 6}}})
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rlhf-reward" and hpa["spec"]["maxReplicas"] == 6
    (reward,) = find(objects, "Deployment", "-reward")
    assert "replicas" not in reward["spec"]


def test_auth_token_is_a_generated_secret_or_an_existing_one_never_a_value(render, chart):
    objects = render()
    (secret,) = find(objects, "Secret", "-auth")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 40 and token.isalnum()
    (reward,) = find(objects, "Deployment", "-reward")
    vols = {v["name"]: v for v in reward["spec"]["template"]["spec"]["volumes"]}
    assert vols["auth"]["secret"]["secretName"] == "rlhf-auth"
    objects = render({"auth": {"existingSecret": "my-token", "secretKey": "api-token"}})
    assert not find(objects, "Secret", "-auth")
    (reward,) = find(objects, "Deployment", "-reward")
    vols = {v["name"]: v for v in reward["spec"]["template"]["spec"]["volumes"]}
    assert vols["auth"]["secret"] == {
        "secretName": "my-token",
        "items": [{"key": "api-token", "path": "token"}],
    }
    with pytest.raises(helm_python.HelmValuesError, match="token"):
        chart.validate_schema({"auth": {"token": "plain-text"}})


def test_bundled_postgresql_statefulset_with_a_pvc_and_a_generated_url(render):
    objects = render()
    (sts,) = find(objects, "StatefulSet", "-postgresql")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    (secret,) = find(objects, "Secret", "-postgresql")
    url = base64.b64decode(secret["data"]["url"]).decode()
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert url == f"postgresql://rlhf:{password}@rlhf-postgresql.ml.svc:5432/rlhf"
    (feedback,) = find(objects, "Deployment", "-feedback")
    vols = {v["name"]: v for v in feedback["spec"]["template"]["spec"]["volumes"]}
    assert vols["database"]["secret"] == {
        "secretName": "rlhf-postgresql",
        "items": [{"key": "url", "path": "url"}],
    }


def test_external_postgresql_comes_from_an_existing_secret(render):
    objects = render(EXTERNAL_DB)
    assert not find(objects, "StatefulSet") and not find(objects, "Secret", "-postgresql")
    (feedback,) = find(objects, "Deployment", "-feedback")
    vols = {v["name"]: v for v in feedback["spec"]["template"]["spec"]["volumes"]}
    assert vols["database"]["secret"] == {
        "secretName": "feedback-db",
        "items": [{"key": "DATABASE_URL", "path": "url"}],
    }


def test_monitoring_objects_only_behind_their_flags(render):
    kinds = {o["kind"] for _, o in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    objects = render(MONITORING)
    (sm,) = find(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    (pm,) = find(objects, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    assert len(find(objects, "PrometheusRule")) == 1
    dashboards = [o for o in find(objects, "ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]]
    shipped = sorted(p.name for p in (CHART_DIR / "dashboards").glob("*.json"))
    assert sorted(k for d in dashboards for k in d["data"]) == shipped
    for d in dashboards:
        for text in d["data"].values():
            assert json.loads(text)["uid"].startswith("rlhf-")


def test_helm_test_hook_checks_health_of_every_service_and_scores_one_pair(render):
    objects = render()
    (pod,) = [o for _, o in objects if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "rlhf.k8s.smoke"]
    args = c["args"]
    healths = [args[i + 1] for i, a in enumerate(args) if a == "--health"]
    assert healths == [
        "rlhf-generation.ml.svc:50051",
        "rlhf-reward.ml.svc:50052",
        "rlhf-feedback.ml.svc:50053",
    ]
    assert args[args.index("--score") + 1] == "rlhf-reward.ml.svc:50052"
    assert c["env"][-1]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-auth", "key": "token"}


def _config_files(objects) -> dict[str, str]:
    (cm,) = [o for o in find(objects, "ConfigMap", "-config")]
    return cm["data"]


def test_rendered_config_files_load_into_the_services_config_classes(render, tmp_path):
    """Keys the chart renders are the services' own config keys (unknown keys are errors there)."""
    from rlhf.core.config import load_config
    from rlhf.feedback.config import FeedbackConfig

    classes = {"feedback.yaml": FeedbackConfig}
    for module, cls, key in [
        ("rlhf.generation.config", "GenerationConfig", "generation.yaml"),
        ("rlhf.reward.config", "RewardConfig", "reward.yaml"),
        ("rlhf.trainer.config", "SFTConfig", "trainer-sft.yaml"),
        ("rlhf.trainer.config", "RewardModelConfig", "trainer-reward-model.yaml"),
        ("rlhf.trainer.config", "PPOConfig", "trainer-ppo.yaml"),
    ]:
        try:  # other teams' config classes: checked as soon as they exist
            classes[key] = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            continue
    values = {
        "generation": {"config": {"max_batch_size": 16, "dtype": "bfloat16"}},
        "reward": {"config": {"truncation": "truncate_left"}},
        "feedback": {"config": {"pool_size": 10}, "labeling": {"enabled": True, "tokensSecret": "labelers"}},
        "trainer": {"jobs": {"sft": {"config": {"max_steps": 100, "snapshot": "demos-v1"}}}},
    }
    files = _config_files(render(values))
    assert set(files) == {
        "generation.yaml",
        "reward.yaml",
        "feedback.yaml",
        "trainer-sft.yaml",
        "trainer-reward-model.yaml",
        "trainer-ppo.yaml",
    }
    for key, cls in classes.items():
        path = tmp_path / key
        path.write_text(files[key])
        cfg = load_config(cls, path, environ={})
        assert cfg.auth_token_file == "/var/run/secrets/rlhf/auth/token"
        assert cfg.log_format == "json"
    gen = (
        load_config(classes["generation.yaml"], tmp_path / "generation.yaml", environ={})
        if ("generation.yaml" in classes)
        else None
    )
    if gen is not None:
        assert (gen.port, gen.metrics_port, gen.max_batch_size, gen.dtype) == (50051, 9091, 16, "bfloat16")
    feedback = load_config(FeedbackConfig, tmp_path / "feedback.yaml", environ={})
    assert feedback.database_url_file == "/var/run/secrets/rlhf/database/url" and feedback.pool_size == 10
    assert (
        feedback.labeling_port == 8080
        and feedback.labeling_tokens_file == "/var/run/secrets/rlhf/labeling/tokens"
    )
    sft = yaml.safe_load(files["trainer-sft.yaml"])
    assert sft["max_steps"] == 100 and sft["run_dir"] == "/checkpoints/sft" and sft["resume"] is True
    assert sft["feedback_target"] == "rlhf-feedback.ml.svc:50053"
    ppo = yaml.safe_load(files["trainer-ppo.yaml"])
    assert ppo["model"] == "/checkpoints/sft/final"
    # every replica: the headless Services' DNS names (gRPC round_robin; weight pushes to each pod)
    assert ppo["generation_target"] == "dns:///rlhf-generation-headless.ml.svc:50051"
    assert ppo["reward_target"] == "dns:///rlhf-reward-headless.ml.svc:50052"
    assert ppo["push_dir"] == ""  # the trainer and generation pods share no /dev/shm: stream the weights


def test_a_config_key_the_chart_owns_is_refused_with_its_name(chart):
    with pytest.raises(helm_python.HelmError, match=r"generation\.config\.port: set by the chart"):
        chart.render({"generation": {"config": {"port": 1234}}}, name="rlhf", namespace="ml")
    with pytest.raises(helm_python.HelmError, match=r"trainer\.jobs\.ppo\.config\.reward_target"):
        chart.render(
            {"trainer": {"jobs": {"ppo": {"config": {"reward_target": "x:1"}}}}}, name="r", namespace="n"
        )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"postgresql": {"enabled": False}}, "/feedback/database/existingSecret"),
        ({"generation": {"port": 70000}}, "/generation/port"),
        ({"reward": {"replicas": "two"}}, "/reward/replicas"),
        ({"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
        ({"generaton": {"replicas": 1}}, "generaton"),
        ({"image": {"flavor": "rocm"}}, "/image/flavor"),
        ({"monitoring": {"prometheusRule": {"errorRateThreshold": 2}}}, "errorRateThreshold"),
        ({"trainer": {"jobs": {"sft": {"config": {"Max-Steps": 1}}}}}, "Max-Steps"),
        ({"trainer": {"checkpoints": {"size": "lots"}}}, "/trainer/checkpoints/size"),
    ],
)
def test_bad_values_are_rejected_by_the_schema_naming_the_key(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as info:
        chart.validate_schema(values)
    assert message in str(info.value)


def test_prometheus_rules_pass_promtool(tmp_path):
    from rlhf.k8s.rules import rule_file_text, rule_groups

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    path = tmp_path / "rules.yml"
    path.write_text(
        rule_file_text({"monitoring": {"prometheusRule": {"latencyP99Seconds": {"reward": 0.5}}}})
    )
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [r for g in rule_groups() for r in g["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
    alerts = {r["alert"] for r in rules}
    for wanted in (
        "RLHFServiceDown",
        "RLHFHighErrorRate",
        "RLHFHighLatencyP99",
        "RLHFQueueSaturated",
        "RLHFPolicyKLHigh",
        "RLHFRewardDropped",
        "RLHFRewardScoreDrift",
    ):
        assert wanted in alerts
    assert all(r["labels"]["severity"] and r["annotations"]["summary"] for r in rules)
    shipped = DEPLOY_DIR / "rules" / "rlhf-alerts.yml"
    assert shipped.read_text() == rule_file_text(), "deploy/rules is stale: run python -m rlhf.k8s.rules"
    result = subprocess.run([promtool, "check", "rules", str(shipped)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_and_dashboards_use_only_contract_metric_names(contract, promql):
    from rlhf.k8s.rules import rule_groups

    allowed = contract.series_names()
    used = set()
    for group in rule_groups():
        for rule in group["rules"]:
            names = promql.metric_names(rule["expr"])
            assert names <= allowed, (rule["alert"], names - allowed)
            used |= names
    for path in sorted((CHART_DIR / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                names = promql.metric_names(target["expr"])
                assert names, (path.name, target["expr"])
                assert names <= allowed, (path.name, panel["title"], names - allowed)
                used |= names
    # every service's own metrics appear somewhere
    for family in (
        contract.GENERATION,
        contract.REWARD,
        contract.FEEDBACK,
        contract.LABELING,
        contract.TRAINER,
    ):
        for name, kind in family.items():
            forms = {name} if kind != "histogram" else {f"{name}_{s}" for s in ("bucket", "sum", "count")}
            assert forms & used, f"{name} is on no dashboard and in no alert"


def test_dashboards_are_generated_from_their_script():
    script = DEPLOY_DIR / "grafana" / "make_dashboards.py"
    result = subprocess.run(["python", str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_labeling_page_is_exposed_only_when_enabled(render):
    (svc,) = find(render(), "Service", "-feedback")
    assert "labeling" not in {p["name"] for p in svc["spec"]["ports"]}
    objects = render({"feedback": {"labeling": {"enabled": True, "tokensSecret": "labelers"}}})
    (svc,) = find(objects, "Service", "-feedback")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["labeling"] == 8080
    (dep,) = find(objects, "Deployment", "-feedback")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["labeling-tokens"]["secret"]["secretName"] == "labelers"


def test_reward_starts_without_a_model_until_one_is_set(render):
    files = _config_files(render())
    assert "model" not in yaml.safe_load(files["reward.yaml"])
    files = _config_files(render({"reward": {"model": "/checkpoints/reward-model/final"}}))
    assert yaml.safe_load(files["reward.yaml"])["model"] == "/checkpoints/reward-model/final"


def test_notes_tell_the_user_how_to_reach_the_services(chart):
    notes = chart.render({}, name="rlhf", namespace="ml")["rlhf/templates/NOTES.txt"]
    assert "rlhf-reward.ml.svc:50052" in notes and "helm test rlhf -n ml" in notes
    assert "rlhf k8s submit sft" in notes


def test_chart_files_exist():
    for name in ("Chart.yaml", "values.yaml", "values.schema.json", "templates/NOTES.txt"):
        assert (CHART_DIR / name).exists(), name
    assert Path(CHART_DIR / "values.schema.json").read_text().strip().startswith("{")


def test_generation_and_reward_have_a_headless_service_selecting_the_same_pods(render):
    objects = render({})
    for component, port in (("generation", 50051), ("reward", 50052)):
        (plain,) = find(objects, "Service", f"rlhf-{component}")
        (headless,) = find(objects, "Service", f"rlhf-{component}-headless")
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["selector"] == plain["spec"]["selector"]
        assert [p["port"] for p in headless["spec"]["ports"]] == [port]
        # not scraped twice: only the plain Service carries the metrics label
        assert "rlhf.dev/metrics" not in headless["metadata"]["labels"]


def test_paths_a_client_may_name_stay_on_the_mounts_unless_the_user_says_otherwise(render):
    def configs(values):
        (cm,) = find(render(values), "ConfigMap", "rlhf-config")
        return yaml.safe_load(cm["data"]["generation.yaml"]), yaml.safe_load(cm["data"]["reward.yaml"])

    generation, reward = configs({})
    assert generation["weight_roots"] == ["/models", "/checkpoints", "/dev/shm"]
    assert reward["model_roots"] == ["/models", "/checkpoints"]
    generation, reward = configs({"generation": {"config": {"weight_roots": ["/weights"]}}})
    assert generation["weight_roots"] == ["/weights"] and reward["model_roots"] == ["/models", "/checkpoints"]
