"""The labeling page's metrics (on the feedback service's ``/metrics``: the page runs in its process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from rlhf.feedback.metrics import count_written
from rlhf.labeling.tasks import SubmitResult

JUDGMENTS = Counter("rlhf_labeling_judgments", "Judgments stored from the labeling page (replays excluded).")
JUDGMENT_SECONDS = Histogram(
    "rlhf_labeling_judgment_seconds",
    "Time a labeler spent on a judgment: from being given the task to submitting it.",
    buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800),
)
QUEUE_DEPTH = Gauge("rlhf_labeling_queue_depth", "Judgments the labeling queue still waits for.")


def count_judgment(result: SubmitResult) -> None:
    """A judgment newly stored: the labeling counters and the feedback service's record counts."""
    JUDGMENTS.inc()
    if result.seconds is not None:
        JUDGMENT_SECONDS.observe(result.seconds)
    for kind, n in result.created_by_kind.items():
        count_written(kind, n)
