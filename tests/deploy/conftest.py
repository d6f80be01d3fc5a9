"""Fixtures of the deployment tests: the chart rendered offline with the real Helm engine (helm-python-sdk)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "rlhf"
DEPLOY_DIR = REPO / "deploy"


@pytest.fixture(scope="session")
def chart():
    helm_python = pytest.importorskip("helm_python")
    return helm_python.Chart.load(str(CHART_DIR))


@pytest.fixture(scope="session")
def render(chart):
    """render(values) -> list of (template path, object) for every rendered manifest document."""

    def _render(
        values: dict | None = None, *, namespace: str = "ml", name: str = "rlhf"
    ) -> list[tuple[str, dict]]:
        manifests = chart.render(values or {}, name=name, namespace=namespace)
        objects = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            objects.extend((path, doc) for doc in yaml.safe_load_all(text) if doc)
        return objects

    return _render


def find(objects: list[tuple[str, dict]], kind: str, name_suffix: str = "") -> list[dict]:
    return [o for _, o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]


def _load_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"tests_deploy_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def contract():
    """tests/deploy/metrics_contract.py: the metric names every query must stick to."""
    return _load_module("metrics_contract")


@pytest.fixture(scope="session")
def promql():
    """tests/deploy/promql.py: metric names in a query, the filter-free form of an alert expression."""
    return _load_module("promql")
