"""Fixtures of the generation tests: a served tiny model in another process, helpers to read its metrics."""

from __future__ import annotations

import re
import urllib.request

import grpc
import pytest

from rlhf.core.launcher import Launcher

SERVE = ["serve", "generation"]


def serve_args(model_path, *extra: str) -> list[str]:
    return ["--model", str(model_path), "--torch-threads", "1", "--batch-wait-ms", "20", *extra]


def start_generation(launcher: Launcher, name: str, model_path, *extra: str):
    return launcher.start(name, SERVE, args=serve_args(model_path, *extra), timeout=180)


def scrape(service) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line ``name{labels} value`` (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{\})?") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.M)
    return float(found.group(found.lastindex)) if found else 0.0


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


@pytest.fixture(scope="session")
def peaked_lm_path(tmp_path_factory):
    """A tiny random Llama like tiny_lm_path (same shapes) with larger weights: sharp, varied greedy outputs."""
    from rlhf.core.models import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("peaked-lm"), seed=1, initializer_range=0.5)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    with Launcher(tmp_path_factory.mktemp("services")) as launcher:
        yield launcher
