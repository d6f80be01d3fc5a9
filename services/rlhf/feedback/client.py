"""A small blocking client of the feedback store for the trainer, the demo and the CLI.

Writes larger than ``batch_size`` are sent as several batches; each batch is atomic and idempotent, and is
retried with the one retry policy (``rlhf.core.client.call_with_retry``) on UNAVAILABLE / RESOURCE_EXHAUSTED,
so a batch that was committed just before a connection dropped returns its ids again on the retry.
``export`` resumes from the last cursor when the stream breaks with a retryable code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import grpc

from rlhf.core.client import RetryPolicy, call_with_retry, make_channel
from rlhf.feedback import records as rec
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger("rlhf.feedback.client")


def merge_results(results: Sequence[feedback_pb2.WriteResult]) -> feedback_pb2.WriteResult:
    merged = feedback_pb2.WriteResult()
    for result in results:
        merged.ids.extend(result.ids)
        merged.created += result.created
        merged.existing += result.existing
    return merged


class FeedbackClient:
    """Blocking calls to a FeedbackService at ``target`` (host:port)."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca_file: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 120.0,
        batch_size: int = 1000,
        max_message_mb: int = 64,
    ):
        self.target = target
        self.channel = make_channel(
            target, token=token, tls=tls, tls_ca_file=tls_ca_file, max_message_mb=max_message_mb
        )
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.batch_size = batch_size

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request):
        fn = getattr(self.stub, method)
        return call_with_retry(
            lambda: fn(request, timeout=self.timeout), self.retry, f"FeedbackService.{method}"
        )

    def _add(self, method: str, request_cls, field_name: str, items: Sequence) -> feedback_pb2.WriteResult:
        items = list(items)
        results = []
        for start in range(0, len(items), self.batch_size):
            request = request_cls(**{field_name: items[start : start + self.batch_size]})
            results.append(self._call(method, request).result)
        return merge_results(results)

    # ---- writes (lists of rlhf.v1 messages; see rlhf.feedback.records.make_* to build them) ----------

    def add_labelers(self, labelers: Sequence[feedback_pb2.Labeler]) -> feedback_pb2.WriteResult:
        return self._add("AddLabelers", feedback_pb2.AddLabelersRequest, "labelers", labelers)

    def add_prompts(self, prompts: Sequence[feedback_pb2.PromptRecord]) -> feedback_pb2.WriteResult:
        return self._add("AddPrompts", feedback_pb2.AddPromptsRequest, "prompts", prompts)

    def add_demonstrations(self, items: Sequence[feedback_pb2.Demonstration]) -> feedback_pb2.WriteResult:
        return self._add("AddDemonstrations", feedback_pb2.AddDemonstrationsRequest, "demonstrations", items)

    def add_comparisons(self, items: Sequence[feedback_pb2.Comparison]) -> feedback_pb2.WriteResult:
        return self._add("AddComparisons", feedback_pb2.AddComparisonsRequest, "comparisons", items)

    def add_ratings(self, items: Sequence[feedback_pb2.Rating]) -> feedback_pb2.WriteResult:
        return self._add("AddRatings", feedback_pb2.AddRatingsRequest, "ratings", items)

    # ---- reads ----------------------------------------------------------------------------------------

    def export(
        self, request: feedback_pb2.ExportRequest | None = None, **kw
    ) -> Iterator[feedback_pb2.ExportResponse]:
        """Stream records (``ExportResponse`` messages, see ``records.exported_record``).

        Keywords as :func:`rlhf.feedback.records.make_export_request`: ``snapshot``, ``split`` ("train",
        "eval"), ``kinds`` (e.g. ["comparison"]), ``labeler_ids``, ``created_after_us``, ``created_before_us``,
        ``cursor``, ``limit``.
        """
        if request is None:
            request = rec.make_export_request(**kw)
        else:
            request = feedback_pb2.ExportRequest.FromString(request.SerializeToString())  # we move its cursor
        remaining = request.limit or None
        start = time.monotonic()
        backoffs = self.retry.backoffs()
        while True:
            try:
                for message in self.stub.Export(request, timeout=None):
                    request.cursor = message.cursor
                    if remaining is not None:
                        remaining -= 1
                    yield message
                return
            except grpc.RpcError as exc:
                elapsed = time.monotonic() - start
                if exc.code() not in self.retry.retryable or elapsed >= self.retry.retry_timeout:
                    raise
                if remaining == 0:
                    return
                if remaining is not None:
                    request.limit = remaining
                delay = next(backoffs)
                log.warning("Export broke with %s; resuming in %.2fs", exc.code().name, delay)
                time.sleep(delay)

    def get_stats(self) -> feedback_pb2.GetStatsResponse:
        return self._call("GetStats", feedback_pb2.GetStatsRequest())

    def create_snapshot(
        self,
        name: str,
        *,
        eval_fraction: float = 0.1,
        seed: int = 0,
        kinds: Sequence[str | int] = (),
        labeler_ids: Sequence[str] = (),
        created_after_us: int | None = None,
        created_before_us: int | None = None,
        description: str = "",
    ) -> feedback_pb2.Snapshot:
        """Freeze the matching records as ``name`` (idempotent for identical parameters)."""
        snapshot = feedback_pb2.Snapshot(
            name=name,
            filter=rec.make_filter(kinds, labeler_ids, created_after_us, created_before_us),
            eval_fraction=eval_fraction,
            seed=seed,
            description=description,
        )
        return self._call("CreateSnapshot", feedback_pb2.CreateSnapshotRequest(snapshot=snapshot)).snapshot

    def get_snapshot(self, name: str) -> feedback_pb2.Snapshot:
        return self._call("GetSnapshot", feedback_pb2.GetSnapshotRequest(name=name)).snapshot

    def list_snapshots(self) -> list[feedback_pb2.Snapshot]:
        return list(self._call("ListSnapshots", feedback_pb2.ListSnapshotsRequest()).snapshots)
