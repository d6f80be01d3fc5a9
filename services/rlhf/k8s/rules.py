"""The chart's alert rules as a plain Prometheus rule file (for Prometheus outside Kubernetes and promtool).

    python -m rlhf.k8s.rules                 # rewrite deploy/rules/rlhf-alerts.yml from charts/rlhf
    python -m rlhf.k8s.rules --out - -f my-values.yaml

The PrometheusRule template is the one source; this extracts its ``spec.groups`` rendered with the values given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from rlhf.k8s.jobs import default_chart_dir, helm_engine, load_values

RULE_TEMPLATE = "templates/monitoring/prometheusrule.yaml"
HEADER = "# Generated from charts/rlhf (PrometheusRule, default values) by `python -m rlhf.k8s.rules`; do not edit.\n"


def rule_groups(values: dict | None = None, chart_dir: str | Path | None = None) -> list[dict]:
    """``spec.groups`` of the chart's PrometheusRule rendered with ``values`` (prometheusRule forced on)."""
    helm_python = helm_engine()
    values = dict(values or {})
    monitoring = dict(values.get("monitoring") or {})
    monitoring["prometheusRule"] = {**(monitoring.get("prometheusRule") or {}), "enabled": True}
    values["monitoring"] = monitoring
    chart = helm_python.Chart.load(str(chart_dir or default_chart_dir()))
    manifests = chart.render(values, name="rlhf", namespace="default")
    text = next(t for path, t in manifests.items() if path.endswith(RULE_TEMPLATE))
    return yaml.safe_load(text)["spec"]["groups"]


def rule_file_text(values: dict | None = None, chart_dir: str | Path | None = None) -> str:
    return HEADER + yaml.safe_dump({"groups": rule_groups(values, chart_dir)}, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    default_out = default_chart_dir().parents[1] / "deploy" / "rules" / "rlhf-alerts.yml"
    parser = argparse.ArgumentParser(prog="python -m rlhf.k8s.rules", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(default_out), help=f"Rule file to write ('-' = stdout; default {default_out})."
    )
    parser.add_argument("-f", "--values", action="append", default=[], help="Chart values file (repeatable).")
    parser.add_argument(
        "--set", action="append", default=[], help="Chart value override (helm --set syntax)."
    )
    args = parser.parse_args(argv)
    text = rule_file_text(load_values(args.values, args.set))
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
