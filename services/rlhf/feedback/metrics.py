"""The feedback service's metrics (on its ``/metrics`` endpoint), shared by the gRPC servicer and the labeling
page, which stores records too."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from rlhf.core.server import LATENCY_BUCKETS

RECORDS_WRITTEN = Counter(
    "rlhf_feedback_records_written", "Records newly stored (idempotent replays excluded), by kind.", ["kind"]
)
RECORDS_REJECTED = Counter(
    "rlhf_feedback_records_rejected",
    "Records not written because their batch was rejected, by kind and the reason of the rejection.",
    ["kind", "reason"],
)
WRITE_LATENCY = Histogram(
    "rlhf_feedback_write_duration_seconds",
    "Time to validate and durably commit one write batch, by kind.",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
READ_LATENCY = Histogram(
    "rlhf_feedback_read_duration_seconds",
    "Time of one read: an export page, stats or a snapshot operation.",
    ["op"],
    buckets=LATENCY_BUCKETS,
)
STORE_SIZE = Gauge(
    "rlhf_feedback_store_size_bytes", "Size of the database on disk (SQLite files or PostgreSQL database)."
)
RECORDS = Gauge("rlhf_feedback_records", "Records in the store, by kind.", ["kind"])


def count_written(kind: str, created: int) -> None:
    """Records newly stored: the written counter and the per-kind gauge."""
    RECORDS_WRITTEN.labels(kind).inc(created)
    RECORDS.labels(kind).inc(created)
