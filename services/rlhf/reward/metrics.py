"""Prometheus metrics of the reward service (names fixed by the dashboards and alerts)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from rlhf.core.server import LATENCY_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SCORE_BUCKETS = (-20, -10, -5, -3, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 3, 5, 10, 20)

PAIRS_SCORED = Counter("rlhf_reward_pairs_scored", "Pairs scored (one per item of a successful Score).")
REQUEST_DURATION = Histogram(
    "rlhf_reward_request_duration_seconds",
    "Score latency from receipt to response: validation, queueing, forward passes.",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "rlhf_reward_batch_size", "Pairs per forward pass (micro-batches across callers).", buckets=BATCH_BUCKETS
)
QUEUE_DEPTH = Gauge("rlhf_reward_queue_depth", "Pairs waiting for a forward pass.")
MODEL_INFO = Gauge("rlhf_reward_model_info", "1 for the reward-model version being served.", ["version"])
MODEL_LOADS = Counter(
    "rlhf_reward_model_loads", "Reward-model loads (startup and LoadModel), by result.", ["result"]
)
SCORES = Histogram(
    "rlhf_reward_score", "Raw scores returned (watch it for reward drift).", buckets=SCORE_BUCKETS
)
REQUESTS_REJECTED = Counter("rlhf_reward_requests_rejected", "Score requests refused, by reason.", ["reason"])
