"""Many generation replicas behind one target: calls spread by gRPC's round_robin, weights pushed to every
replica, a late replica caught up before it serves, a dead replica costing a retry (real service processes)."""

from __future__ import annotations

import re
import signal
import urllib.request

import pytest
import torch

from rlhf.core.client import RetryPolicy, channel_target, replica_addresses
from rlhf.core.launcher import Launcher
from rlhf.core.models import load_causal_lm
from rlhf.generation.client import PolicyClient
from rlhf.trainer.weight_sync import PolicySync

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
pytestmark = pytest.mark.slow


def test_a_target_names_every_replica_as_a_list_or_a_dns_name():
    assert replica_addresses("127.0.0.1:2,127.0.0.1:1,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert replica_addresses("dns:///localhost:7") == ["127.0.0.1:7"]  # IPv4 when a host has both families
    assert channel_target("127.0.0.1:1,localhost:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("dns:///rlhf-generation-headless.ml.svc:50051").startswith("dns:///")
    with pytest.raises(ValueError, match="nosuch.invalid"):
        replica_addresses("nosuch.invalid:1")
    with pytest.raises(ValueError, match="host:port"):
        replica_addresses("no-port")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, tiny_lm_path):
    with Launcher(tmp_path_factory.mktemp("replicas"), env=ENV) as launcher:
        for name in ("gen-a", "gen-b"):
            launcher.start(
                name, ["serve", "generation"], args=["--model", str(tiny_lm_path), "--torch-threads", "1"]
            )
        yield launcher


def _generate_calls(launcher, name: str) -> float:
    url = f"http://127.0.0.1:{launcher.services[name].metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = r'rlhf_grpc_server_requests_total\{[^}]*method="Generate"[^}]*\} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, text))


def _version(target: str) -> int:
    with PolicyClient(target) as client:
        return int(client.model_info().version or 0)


def _policy_sync(target: str, push_dir: str) -> PolicySync:
    return PolicySync(PolicyClient(target), push_dir, "test", replica_client=lambda a: PolicyClient(a))


def test_calls_through_one_target_are_spread_over_every_replica(launcher):
    target = ",".join(launcher.services[n].target for n in ("gen-a", "gen-b"))
    before = {n: _generate_calls(launcher, n) for n in ("gen-a", "gen-b")}
    with PolicyClient(target) as client:
        for _ in range(8):
            assert client.generate([[5, 6, 7]], max_new_tokens=2, seed=0)
    spread = {n: _generate_calls(launcher, n) - before[n] for n in before}
    assert sum(spread.values()) == 8
    assert all(calls >= 2 for calls in spread.values()), spread


@pytest.mark.parametrize("push_dir", ["", "/dev/shm"], ids=["stream", "shared-path"])
def test_a_push_reaches_every_replica_and_a_late_replica_is_caught_up(launcher, tiny_lm_path, push_dir):
    model = load_causal_lm(tiny_lm_path, dtype=torch.float32)
    names = ["gen-a", "gen-b"]
    sync = _policy_sync(",".join(launcher.services[n].target for n in names), push_dir)
    try:
        sync.version = max(_version(launcher.services[n].target) for n in names) + 1
        pushed = sync.push(model)
        assert {n: _version(launcher.services[n].target) for n in names} == {n: pushed for n in names}
        assert sync.push(model) == pushed  # nothing to do: every replica serves it

        name = f"gen-late-{'path' if push_dir else 'stream'}"
        launcher.start(
            name, ["serve", "generation"], args=["--model", str(tiny_lm_path), "--torch-threads", "1"]
        )
        names.append(name)
        sync.client = PolicyClient(",".join(launcher.services[n].target for n in names))
        assert _version(launcher.services[name].target) == 0  # joined with its own initial weights
        assert sync.push(model) == pushed  # only the newcomer gets it, under the same version
        assert {n: _version(launcher.services[n].target) for n in names} == {n: pushed for n in names}
    finally:
        sync.close()
        launcher.stop(f"gen-late-{'path' if push_dir else 'stream'}")


def test_a_replica_that_dies_costs_a_retry_not_the_calls_and_pushes_skip_it(launcher, tiny_lm_path):
    launcher.start("gen-doomed", ["serve", "generation"], args=["--model", str(tiny_lm_path)])
    names = ["gen-a", "gen-doomed"]
    target = ",".join(launcher.services[n].target for n in names)
    launcher.services["gen-doomed"].proc.send_signal(signal.SIGKILL)
    launcher.services["gen-doomed"].proc.wait(timeout=30)
    with PolicyClient(target, retry=RetryPolicy(retry_timeout=30)) as client:
        for _ in range(6):
            assert client.generate([[5, 6, 7]], max_new_tokens=2, seed=0)
    sync = _policy_sync(target, "")
    try:
        sync.version = _version(launcher.services["gen-a"].target) + 1
        assert sync.push(load_causal_lm(tiny_lm_path, dtype=torch.float32)) == sync.version
        assert _version(launcher.services["gen-a"].target) == sync.version
    finally:
        sync.close()
