"""Write the Grafana dashboards of the platform to charts/rlhf/dashboards/*.json (the one source of them).

    python deploy/grafana/make_dashboards.py          # rewrite the JSON files
    python deploy/grafana/make_dashboards.py --check  # exit 1 if they are stale (a test runs this)

Every query uses the metric names of the metrics contract (rlhf_*, see the README), ``$namespace`` (a
multi-value variable, ".*" = all) and ``$__rate_interval``. The job-kind gauges (the PPO gauges,
rlhf_rm_eval_accuracy) exist only in job processes of that kind once set; their queries still add
``and on (instance) rlhf_trainer_step{job="..."}``, so a job of an older image, which exported them all as 0,
does not show up as a PPO curve.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "charts" / "rlhf" / "dashboards"
NS = 'namespace=~"$namespace"'
NOT_HEALTH = 'service!="grpc.health.v1.Health",service!~"grpc.reflection.*"'
RATE = "[$__rate_interval]"


def target(expr: str, legend: str = "", instant: bool = False) -> dict:
    t = {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend}
    if instant:
        t["instant"] = True
        t["range"] = False
    return t


def panel(
    title: str,
    targets: list[dict],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    w: int = 12,
    description: str = "",
) -> dict:
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": w, "x": 0, "y": 0},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "options": {},
    }
    if kind == "timeseries":
        p["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        }
    return p


def quantiles(metric: str, by: str, selector: str = "", qs=(0.5, 0.99)) -> list[dict]:
    sel = ",".join(s for s in (NS, selector) if s)
    out = []
    for q in qs:
        legend = f"p{round(q * 100)}" + ("" if not by else " {{" + by.split(",")[0].strip() + "}}")
        group = f"{by}, le" if by else "le"
        out.append(
            target(
                f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}{RATE})))", legend
            )
        )
    return out


def mean_of_histogram(metric: str, by: str = "") -> dict:
    grp = f"sum by ({by}) " if by else "sum "
    return target(
        f"{grp}(rate({metric}_sum{{{NS}}}{RATE})) / {grp}(rate({metric}_count{{{NS}}}{RATE}))",
        "mean" + (" {{" + by + "}}" if by else ""),
    )


def layout(panels: list[dict]) -> list[dict]:
    """Place panels left to right, top to bottom on Grafana's 24-column grid."""
    x = y = row_h = 0
    for i, p in enumerate(panels):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        p["id"] = i + 1
        x += w
        row_h = max(row_h, h)
    return panels


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["rlhf"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "graphTooltip": 1,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(rlhf_server_ready, namespace)", "refId": "namespace"},
                    "definition": "label_values(rlhf_server_ready, namespace)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": layout(panels),
    }


def services_dashboard() -> dict:
    calls = f"rlhf_grpc_server_requests_total{{{NS},{NOT_HEALTH}}}"
    server_errors = (
        f"rlhf_grpc_server_requests_total{{{NS},{NOT_HEALTH},"
        f'code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|RESOURCE_EXHAUSTED"}}'
    )
    return dashboard(
        "rlhf-services",
        "RLHF / Services",
        "Every gRPC server of the platform: up, serving, traffic, errors, latency.",
        [
            panel(
                "Targets up",
                [target(f'up{{{NS},component=~"generation|reward|feedback"}}', "{{component}} {{instance}}")],
                kind="stat",
                w=12,
                description="1 = Prometheus scrapes the service's /metrics.",
            ),
            panel(
                "Serving (health)",
                [target(f"rlhf_server_ready{{{NS}}}", "{{service}} {{instance}}")],
                kind="stat",
                w=12,
                description="1 = the standard health service says SERVING.",
            ),
            panel(
                "Calls per second by method",
                [target(f"sum by (service, method) (rate({calls}{RATE}))", "{{service}}/{{method}}")],
                unit="reqps",
            ),
            panel(
                "Calls per second by status code (not OK)",
                [
                    target(
                        f'sum by (service, code) (rate(rlhf_grpc_server_requests_total{{{NS},{NOT_HEALTH},code!="OK"}}{RATE}))',
                        "{{service}} {{code}}",
                    )
                ],
                unit="reqps",
            ),
            panel(
                "Server-side error ratio",
                [
                    target(
                        f"(sum by (service) (rate({server_errors}{RATE})) or sum by (service) (rate({calls}{RATE})) * 0)"
                        f" / sum by (service) (rate({calls}{RATE}))",
                        "{{service}}",
                    )
                ],
                unit="percentunit",
                description="INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED... over all calls.",
            ),
            panel(
                "Latency p50 / p99 by service",
                quantiles("rlhf_grpc_server_request_duration_seconds", "service", NOT_HEALTH),
                unit="s",
            ),
            panel(
                "In-flight calls",
                [
                    target(
                        f"sum by (service) (rlhf_grpc_server_in_flight_requests{{{NS},{NOT_HEALTH}}})",
                        "{{service}}",
                    )
                ],
            ),
        ],
    )


def generation_dashboard() -> dict:
    return dashboard(
        "rlhf-generation",
        "RLHF / Policy generation",
        "rlhf.v1.PolicyService: request latency, time to first token, throughput, batching, queue, weight updates.",
        [
            panel(
                "Request latency p50 / p99",
                quantiles("rlhf_generation_request_duration_seconds", ""),
                unit="s",
            ),
            panel(
                "Time to first token p50 / p99",
                quantiles("rlhf_generation_time_to_first_token_seconds", ""),
                unit="s",
            ),
            panel(
                "Tokens per second",
                [
                    target(
                        f"sum(rate(rlhf_generation_prompt_tokens_total{{{NS}}}{RATE}))", "prompt (prefill)"
                    ),
                    target(f"sum(rate(rlhf_generation_generation_tokens_total{{{NS}}}{RATE}))", "generated"),
                ],
            ),
            panel(
                "Batch size (mean sequences per forward)", [mean_of_histogram("rlhf_generation_batch_size")]
            ),
            panel(
                "Requests waiting / running",
                [
                    target(
                        f"sum by (instance) (rlhf_generation_num_requests_waiting{{{NS}}})",
                        "waiting {{instance}}",
                    ),
                    target(
                        f"sum by (instance) (rlhf_generation_num_requests_running{{{NS}}})",
                        "running {{instance}}",
                    ),
                ],
            ),
            panel(
                "Policy version serving",
                [target(f"rlhf_generation_policy_version{{{NS}}}", "{{instance}}")],
                kind="stat",
            ),
            panel(
                "Weight update duration p50 / p99",
                quantiles("rlhf_generation_weight_update_duration_seconds", ""),
                unit="s",
            ),
            panel(
                "Weight updates by result",
                [
                    target(
                        f"sum by (result) (increase(rlhf_generation_weight_updates_total{{{NS}}}{RATE}))",
                        "{{result}}",
                    )
                ],
            ),
            panel(
                "Rejected requests by reason",
                [
                    target(
                        f"sum by (reason) (rate(rlhf_generation_requests_rejected_total{{{NS}}}{RATE}))",
                        "{{reason}}",
                    )
                ],
                unit="reqps",
                w=24,
            ),
        ],
    )


def reward_dashboard() -> dict:
    return dashboard(
        "rlhf-reward",
        "RLHF / Reward scoring",
        "rlhf.v1.RewardService: pairs scored, latency, micro-batching, queue, model version, score distribution.",
        [
            panel(
                "Pairs scored per second",
                [target(f"sum(rate(rlhf_reward_pairs_scored_total{{{NS}}}{RATE}))", "pairs/s")],
                unit="ops",
            ),
            panel("Score latency p50 / p99", quantiles("rlhf_reward_request_duration_seconds", ""), unit="s"),
            panel("Batch size (mean pairs per forward)", [mean_of_histogram("rlhf_reward_batch_size")]),
            panel(
                "Queue depth (pairs waiting)",
                [target(f"sum by (instance) (rlhf_reward_queue_depth{{{NS}}})", "{{instance}}")],
            ),
            panel(
                "Model version serving",
                [target(f"rlhf_reward_model_info{{{NS}}} == 1", "{{version}} {{instance}}", instant=True)],
                kind="table",
            ),
            panel(
                "Model loads by result",
                [
                    target(
                        f"sum by (result) (increase(rlhf_reward_model_loads_total{{{NS}}}{RATE}))",
                        "{{result}}",
                    )
                ],
            ),
            panel(
                "Raw score p10 / p50 / p90",
                quantiles("rlhf_reward_score", "", qs=(0.1, 0.5, 0.9)),
                description="Watch for drift: a policy exploiting the reward model pushes it up. (Scores can be "
                "negative, so the client exports no _sum: quantiles come from the buckets.)",
            ),
            panel(
                "Score distribution",
                [target(f"sum by (le) (rate(rlhf_reward_score_bucket{{{NS}}}{RATE}))", "{{le}}")],
                kind="heatmap",
            ),
            panel(
                "Rejected requests by reason",
                [
                    target(
                        f"sum by (reason) (rate(rlhf_reward_requests_rejected_total{{{NS}}}{RATE}))",
                        "{{reason}}",
                    )
                ],
                unit="reqps",
                w=24,
            ),
        ],
    )


def feedback_dashboard() -> dict:
    return dashboard(
        "rlhf-feedback",
        "RLHF / Feedback store",
        "rlhf.v1.FeedbackService: records written and rejected, write/read latency, store size, labeling queue.",
        [
            panel(
                "Records written per second by kind",
                [
                    target(
                        f"sum by (kind) (rate(rlhf_feedback_records_written_total{{{NS}}}{RATE}))", "{{kind}}"
                    )
                ],
                unit="ops",
            ),
            panel(
                "Records rejected by kind and reason",
                [
                    target(
                        f"sum by (kind, reason) (rate(rlhf_feedback_records_rejected_total{{{NS}}}{RATE}))",
                        "{{kind}} {{reason}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Write batch latency p99 by kind",
                quantiles("rlhf_feedback_write_duration_seconds", "kind", qs=(0.99,)),
                unit="s",
            ),
            panel(
                "Read latency p99 by operation",
                quantiles("rlhf_feedback_read_duration_seconds", "op", qs=(0.99,)),
                unit="s",
            ),
            panel(
                "Records stored by kind",
                [target(f"max by (kind) (rlhf_feedback_records{{{NS}}})", "{{kind}}")],
            ),
            panel(
                "Store size", [target(f"max(rlhf_feedback_store_size_bytes{{{NS}}})", "bytes")], unit="bytes"
            ),
            panel(
                "Labeling: judgments per minute",
                [target(f"sum(rate(rlhf_labeling_judgments_total{{{NS}}}{RATE})) * 60", "judgments/min")],
                description="From the labeling web page (feedback labeling_port).",
            ),
            panel(
                "Labeling: time per judgment p50 / p99",
                quantiles("rlhf_labeling_judgment_seconds", ""),
                unit="s",
            ),
            panel(
                "Labeling: judgments still wanted",
                [target(f"max(rlhf_labeling_queue_depth{{{NS}}})", "queue")],
                w=24,
            ),
        ],
    )


def _kind(metric: str, job: str) -> str:
    return f'{metric}{{{NS}}} and on (instance) rlhf_trainer_step{{{NS},job="{job}"}}'


def training_dashboard() -> dict:
    ppo = [
        (
            "Rollout reward (mean, std)",
            [("rlhf_ppo_reward_mean", "mean"), ("rlhf_ppo_reward_std", "std")],
            "short",
        ),
        (
            "KL to the reference model and KL coefficient",
            [("rlhf_ppo_kl", "kl"), ("rlhf_ppo_kl_coef", "kl_coef")],
            "short",
        ),
        ("Policy entropy", [("rlhf_ppo_entropy", "entropy")], "short"),
        ("PPO losses", [("rlhf_ppo_policy_loss", "policy"), ("rlhf_ppo_value_loss", "value")], "short"),
        (
            "Clip fraction and approx KL",
            [("rlhf_ppo_clipfrac", "clipfrac"), ("rlhf_ppo_approx_kl", "approx_kl")],
            "short",
        ),
        ("Response length (tokens)", [("rlhf_ppo_response_length", "tokens")], "short"),
    ]
    return dashboard(
        "rlhf-training",
        "RLHF / Training jobs",
        "Trainer jobs (SFT, reward model, PPO): steps, losses, throughput, phase times, PPO curves, RM accuracy.",
        [
            panel("Step by job", [target(f"max by (job) (rlhf_trainer_step{{{NS}}})", "{{job}}")]),
            panel(
                "Loss by job and split",
                [target(f"max by (job, split) (rlhf_trainer_loss{{{NS}}})", "{{job}} {{split}}")],
            ),
            panel(
                "Tokens per second by job",
                [target(f"max by (job) (rlhf_trainer_tokens_per_second{{{NS}}})", "{{job}}")],
            ),
            panel(
                "Seconds per phase (last occurrence)",
                [target(f"max by (job, phase) (rlhf_trainer_phase_seconds{{{NS}}})", "{{job}} {{phase}}")],
                unit="s",
            ),
            *[
                panel(title, [target(_kind(m, "ppo"), legend) for m, legend in series], unit=unit)
                for title, series, unit in ppo
            ],
            panel(
                "Reward model eval accuracy",
                [target(_kind("rlhf_rm_eval_accuracy", "reward_model"), "accuracy")],
                unit="percentunit",
                w=24,
            ),
        ],
    )


DASHBOARDS = {
    "rlhf-services.json": services_dashboard,
    "rlhf-generation.json": generation_dashboard,
    "rlhf-reward.json": reward_dashboard,
    "rlhf-feedback.json": feedback_dashboard,
    "rlhf-training.json": training_dashboard,
}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="Fail if the JSON files differ from this script."
    )
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(
            f"stale dashboards (run python {Path(__file__).relative_to(OUT.parents[2])}): {stale}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
