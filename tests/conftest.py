"""Fixtures every test folder shares: tiny random models (built once per session, never downloaded)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        from rlhf.core.models import set_torch_threads
    except ImportError:  # torch not installed: only the tests that do not need it run
        return
    set_torch_threads(int(os.environ.get("RLHF_TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory):
    """A tiny random Llama causal LM with a ChatML tokenizer, saved as an HF folder."""
    from rlhf.core.models import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_rm_path(tmp_path_factory):
    """A tiny random Llama reward model (one-label sequence classifier) with the same tokenizer."""
    from rlhf.core.models import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _debian_versions(names: list[str]) -> dict[str, str]:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}=${Version}\\n", *names], capture_output=True, text=True
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def pytest_report_header(config):
    """The system packages the suite runs against, beside the versions deploy/system-packages.txt records."""
    listed = {}
    with open(os.path.join(REPO, "deploy", "system-packages.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, version = line.strip().split("=", 1)
                listed[name] = version
    try:
        installed = _debian_versions(list(listed))
    except FileNotFoundError:  # not a Debian machine
        installed = {}
    parts = []
    for name, version in listed.items():
        have = installed.get(name, "not installed")
        parts.append(f"{name} {have}" + ("" if have == version else f" (last run with {version})"))
    python_pins = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "grpcio", "protobuf")
    )
    return [f"system packages: {'; '.join(parts)}", f"python packages (requirements.lock): {python_pins}"]
