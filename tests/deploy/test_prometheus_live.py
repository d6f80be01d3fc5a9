"""A real Prometheus scrapes the real services; every dashboard and alert query returns data from it.

Starts the services on free ports (feedback with the labeling page; reward on a tiny reward checkpoint;
generation on a tiny causal LM once ``rlhf serve generation`` exists), two tiny trainer jobs (SFT and reward
model) that run until stopped, and Prometheus (Debian package) with deploy/prometheus.yml pointed at those ports
and the chart's alert rules. It drives traffic (the helm-test smoke check, writes, reads, invalid and
over-capacity calls), then asks Prometheus' HTTP API for every query of charts/rlhf/dashboards/*.json and every
alert expression (comparisons turned into ``bool`` so the data shows without the alert firing).

Queries that need a component this machine cannot run here are listed as not covered (the test says which).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml

from .conftest import CHART_DIR, DEPLOY_DIR

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
TOKEN = "deploy-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Prom:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.base}{path}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


def start_trainer(kind: str, workdir: Path, args: list[str]) -> tuple[subprocess.Popen, dict]:
    """A trainer job with a large step budget (stopped with SIGTERM by the test); returns its ports."""
    port_file = workdir / f"{kind}.ports.json"
    argv = [
        sys.executable, "-m", "rlhf.cli", "train", kind, *args, "--run-dir", str(workdir / f"run-{kind}"),
        "--max-steps", "100000", "--max-length", "64", "--checkpoint-every", "0",
        *([] if kind == "ppo" else ["--eval-every", "2"]),  # PPO has no eval loop
        "--no-progress", "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
        "--metrics-port", "0", "--port-file", str(port_file), "--torch-threads", "1",
    ]  # fmt: skip
    with open(workdir / f"{kind}.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"{kind} job exited {proc.returncode}:\n{(workdir / f'{kind}.log').read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{kind} job did not bind its ports")
        time.sleep(0.1)
    return proc, json.loads(port_file.read_text())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def prometheus_config(targets: dict[str, list[int]], rules_file: Path) -> dict:
    """deploy/prometheus.yml with its targets pointed at the given metrics ports and a 1 s scrape interval."""
    config = yaml.safe_load((DEPLOY_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules_file)]
    jobs = []
    for job in config["scrape_configs"]:
        component = job["static_configs"][0]["labels"]["component"]
        if not targets.get(component):
            continue
        job.pop("file_sd_configs", None)
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{p}" for p in targets[component]]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for path in sorted((CHART_DIR / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
    return out


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in as Grafana would for 'All' and a 1 s scrape."""
    return expr.replace("$namespace", ".*").replace("$__rate_interval", "1m")


def needs(expr: str, contract) -> str | None:
    """The component a query needs that may not run here, or None."""
    if "rlhf_ppo_" in expr or 'job="ppo"' in expr:
        return "ppo"
    if any(name in expr for name in contract.GENERATION) or "PolicyService" in expr:
        return "generation"
    return None


@pytest.fixture
def rm_checkpoint(tiny_rm_path, tmp_path):
    from rlhf.core.models import load_reward_model, load_tokenizer
    from rlhf.reward.checkpoint import save_reward_checkpoint

    return save_reward_checkpoint(
        load_reward_model(tiny_rm_path),
        load_tokenizer(tiny_rm_path),
        tmp_path / "rm-v1",
        reward_mean=0.0,
        reward_std=1.0,
        version="tiny-v1",
    )


def drive_feedback(target: str) -> None:
    import grpc

    from rlhf.core.client import RetryPolicy
    from rlhf.feedback.client import FeedbackClient
    from rlhf.feedback.records import make_comparison, make_demonstration, make_export_request

    with FeedbackClient(target, token=TOKEN, retry=RetryPolicy(retry_timeout=0)) as client:
        client.add_demonstrations(
            [
                make_demonstration(f"Say hi #{i}", "hi", idempotency_key=f"d{i}", labeler_id="ann")
                for i in range(5)
            ]
        )
        client.add_comparisons(
            [
                make_comparison(f"Pick #{i}", ["good", "bad"], idempotency_key=f"c{i}", chosen_index=0)
                for i in range(5)
            ]
        )
        with pytest.raises(grpc.RpcError):  # chosen_index out of range: rejected, counted by reason
            client.add_comparisons([make_comparison("x", ["a", "b"], idempotency_key="bad", chosen_index=5)])
        list(client.export(make_export_request()))
        client.get_stats()


def drive_reward(target: str) -> None:
    import grpc

    from rlhf.core.client import RetryPolicy
    from rlhf.reward.client import RewardClient

    # valid traffic retries RESOURCE_EXHAUSTED as a client would (max_queue is 2 and the machine may be busy)
    with RewardClient(target, token=TOKEN, retry=RetryPolicy(retry_timeout=30)) as client:
        for i in range(5):
            scores = client.score([(f"Question {i}?", "An answer."), ("Hello", "Hi there")])
            assert len(scores) == 2
    with RewardClient(target, token=TOKEN, retry=RetryPolicy(retry_timeout=0)) as client:
        with pytest.raises(grpc.RpcError) as info:  # invalid: no items
            client.score_detailed([])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:  # more pairs than max_queue: turned away
            client.score([("a", "b"), ("c", "d"), ("e", "f")])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def drive_generation(target: str, tiny_lm_path) -> None:
    import grpc

    from rlhf.core.client import RetryPolicy
    from rlhf.generation.client import PolicyClient

    with PolicyClient(target, token=TOKEN, retry=RetryPolicy(retry_timeout=0)) as client:
        for i in range(3):
            samples = client.generate([f"Tell me about #{i}"], max_new_tokens=8, seed=i)
            assert samples
        with pytest.raises(grpc.RpcError):
            client.generate([""], max_new_tokens=100000)
        # the PPO job pushes its own versions to this service concurrently: push past whatever it serves now
        for attempt in range(5):
            version = int(client.model_info().version or 0) + 1
            try:
                assert client.update_weights(version=version, checkpoint_path=str(tiny_lm_path)) == version
                break
            except grpc.RpcError as exc:  # the trainer pushed the same version first
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or attempt == 4:
                    raise
        # over capacity (max_queue 1): while a long request runs, a 2-sample one is turned away
        errors = []

        def long_call():
            try:
                client.generate(["Busy"], max_new_tokens=64, seed=0)
            except grpc.RpcError as exc:
                errors.append(exc)

        for _ in range(20):
            t = threading.Thread(target=long_call)
            t.start()
            try:
                client.generate(["Second"], max_new_tokens=4, n=2)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    t.join()
                    break
            finally:
                t.join()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian package) is not installed")
def test_every_dashboard_and_alert_query_returns_data_from_a_real_prometheus(
    tmp_path, tiny_lm_path, rm_checkpoint, contract, promql
):
    from rlhf.core.launcher import Launcher
    from rlhf.k8s import smoke
    from rlhf.k8s.rules import rule_groups

    trainer_data = tmp_path / "data"
    trainer_data.mkdir()
    sft_data = write_jsonl(
        trainer_data / "sft.jsonl",
        [{"prompt": f"Say something about {i}.", "completion": f"Here is {i}."} for i in range(32)],
    )
    rm_data = write_jsonl(
        trainer_data / "prefs.jsonl",
        [{"prompt": f"Rate {i}", "chosen": "wonderful", "rejected": "terrible"} for i in range(32)],
    )
    with_generation = has_module("rlhf.generation.cli") and has_module("rlhf.generation.client")
    env = {"RLHF_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    trainers: list[subprocess.Popen] = []
    prom_proc = None
    with Launcher(tmp_path / "services", env=env) as launcher:
        try:
            common = ["--auth-token", TOKEN, "--torch-threads", "1"]
            feedback = launcher.start(
                "feedback",
                ["serve", "feedback"],
                args=[*common, "--database-url", f"sqlite:///{tmp_path / 'fb.db'}", "--labeling-port", "0",
                      "--stats-refresh-seconds", "1"],
            )  # fmt: skip
            reward = launcher.start(
                "reward",
                ["serve", "reward"],
                args=[*common, "--model", str(rm_checkpoint), "--max-queue", "2"],
            )
            targets = {"feedback": [feedback.metrics_port], "reward": [reward.metrics_port], "trainer": []}
            if with_generation:
                generation = launcher.start(
                    "generation",
                    ["serve", "generation"],
                    args=[*common, "--model", str(tiny_lm_path), "--max-queue", "1", "--max-batch-size", "2"],
                )
                targets["generation"] = [generation.metrics_port]
            fit = ["--model", str(tiny_lm_path), "--batch-size", "4", "--micro-batch-size", "4"]
            fit += ["--eval-fraction", "0.25"]
            jobs = [
                ("sft", [*fit, "--data-file", sft_data]),
                ("reward-model", [*fit, "--data-file", rm_data]),
            ]
            if with_generation:  # PPO against the services above: the PPO panels and alerts get data too
                jobs.append(
                    (
                        "ppo",
                        ["--model", str(tiny_lm_path), "--data-file", sft_data, "--batch-size", "2",
                         "--micro-batch-size", "2", "--response-length", "8", "--push-dir", str(tmp_path / "push"),
                         "--generation-target", generation.target, "--generation-token", TOKEN,
                         "--reward-target", reward.target, "--reward-token", TOKEN],
                    )
                )  # fmt: skip
            for kind, args in jobs:
                proc, ports = start_trainer(kind, tmp_path, args)
                trainers.append(proc)
                targets["trainer"].append(ports["metrics_port"])

            rules_file = tmp_path / "rules.yml"
            rules_file.write_text(yaml.safe_dump({"groups": rule_groups()}))
            config_file = tmp_path / "prometheus.yml"
            config_file.write_text(yaml.safe_dump(prometheus_config(targets, rules_file)))
            check = subprocess.run(
                ["promtool", "check", "config", str(config_file)], capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr
            port = free_port()
            with open(tmp_path / "prometheus.log", "wb") as prom_log:
                prom_proc = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}"],
                    stdout=prom_log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            prom = Prom(port)
            deadline = time.monotonic() + 60
            while not prom.ready():
                assert prom_proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "prometheus not ready"
                time.sleep(0.2)

            # traffic: the helm test's own check first, then every kind of call the dashboards show
            health = [feedback.target, reward.target] + ([generation.target] if with_generation else [])
            argv = sum((["--health", t] for t in health), []) + ["--score", reward.target, "--token", TOKEN]
            assert smoke.main(argv) == 0
            drive_feedback(feedback.target)
            drive_reward(reward.target)
            if with_generation:
                drive_generation(generation.target, tiny_lm_path)

            queries = [(where, concrete(e)) for where, e in dashboard_queries()]
            queries += [
                (f"alert {r['alert']}", promql.unfiltered(r["expr"]))
                for g in rule_groups()
                for r in g["rules"]
            ]
            not_covered = {
                where: needs(expr, contract)
                for where, expr in queries
                if needs(expr, contract) in ("ppo", "generation") and not with_generation
            }
            pending = {(w, e) for w, e in queries if w not in not_covered}
            # Wait (bounded) until Prometheus has scraped the traffic: rates need two samples after it.
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                pending = {(w, e) for w, e in pending if not prom.query(e)}
                if pending:
                    time.sleep(1)
            assert not pending, "queries without data:\n" + "\n".join(f"{w}: {e}" for w, e in sorted(pending))

            rules = prom.get("/api/v1/rules")["data"]["groups"]
            assert {g["name"] for g in rules} == {"rlhf-services", "rlhf-training"}
            assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
            up = prom.query('up{component=~"generation|reward|feedback|trainer"}')
            assert len(up) == sum(len(v) for v in targets.values()) and all(s["value"][1] == "1" for s in up)
            covered = len(queries) - len(not_covered)
            assert covered >= 40
            if not_covered:
                warnings.warn(
                    f"{len(not_covered)} of {len(queries)} queries not covered here (need "
                    f"{sorted(set(not_covered.values()))}): {sorted(not_covered)}",
                    stacklevel=1,
                )
        finally:
            for proc in trainers:
                stop(proc)
            if prom_proc is not None:
                stop(prom_proc)
    for proc in trainers:
        # 0: the job had finished; 143: SIGTERM stopped it after a checkpoint (so a Kubernetes Job retries it)
        assert proc.returncode in (0, 143), (
            f"a trainer job did not stop cleanly on SIGTERM: {proc.returncode}"
        )
