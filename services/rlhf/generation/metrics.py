"""Prometheus metrics of the policy generation service (names fixed by the dashboards; read like vLLM's)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from rlhf.core.server import LATENCY_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)

REQUEST_DURATION = Histogram(
    "rlhf_generation_request_duration_seconds",
    "Time from a Generate call entering the queue to its last sample finishing.",
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "rlhf_generation_time_to_first_token_seconds",
    "Time from a request entering the queue to its first sampled token.",
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("rlhf_generation_prompt_tokens", "Prompt tokens prefilled (per sequence).")
GENERATION_TOKENS = Counter("rlhf_generation_generation_tokens", "Tokens sampled.")
BATCH_SIZE = Histogram(
    "rlhf_generation_batch_size",
    "Sequences in each forward pass (prefill or decode step).",
    buckets=BATCH_BUCKETS,
)
REQUESTS_WAITING = Gauge("rlhf_generation_num_requests_waiting", "Requests queued, not yet in the batch.")
REQUESTS_RUNNING = Gauge("rlhf_generation_num_requests_running", "Requests with sequences in the batch.")
POLICY_VERSION = Gauge("rlhf_generation_policy_version", "Policy version of the weights serving now.")
WEIGHT_UPDATE_DURATION = Histogram(
    "rlhf_generation_weight_update_duration_seconds",
    "Time from the first UpdateWeights message to the swap (successful updates).",
    buckets=LATENCY_BUCKETS,
)
WEIGHT_UPDATES = Counter(
    "rlhf_generation_weight_updates",
    "UpdateWeights calls by result (ok, invalid, rejected, error).",
    ["result"],
)
REQUESTS_REJECTED = Counter(
    "rlhf_generation_requests_rejected",
    "Generate calls refused before generation, by reason (invalid, queue_full, stale_version, unsupported).",
    ["reason"],
)
