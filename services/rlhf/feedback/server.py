"""``rlhf serve feedback``: the FeedbackService servicer, a thin adapter over :class:`FeedbackStore`.

Blocking database work runs in a small thread pool so the event loop stays free; the store serializes writes
itself. The store is opened (and its schema migrated) in the ``load`` hook, so the health service reports
NOT_SERVING until the database is reachable and up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf.core.errors import AlreadyExists, InvalidArgument, ServiceError
from rlhf.core.files import atomic_write_text
from rlhf.core.server import ServerHandle, ServiceDef, serve_forever
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.engine import redact_url
from rlhf.feedback.metrics import (
    READ_LATENCY,
    RECORDS,
    RECORDS_REJECTED,
    STORE_SIZE,
    WRITE_LATENCY,
    count_written,
)
from rlhf.feedback.store import FeedbackStore
from rlhf.feedback.validation import RecordError
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger("rlhf.feedback")


def rejection_reason(exc: ServiceError) -> str:
    """A bounded label for the rejected-records metric."""
    if isinstance(exc, RecordError):
        return exc.reason
    if isinstance(exc, AlreadyExists):
        return "idempotency_conflict"
    if isinstance(exc, InvalidArgument):
        return "invalid"
    return exc.code.name.lower()


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, config: FeedbackConfig, labeling_page: Callable | None = None):
        """``labeling_page(store, config)`` starts the labeling web page (:func:`rlhf.labeling.web.start_page`)
        once the store is open, when ``config.labeling_port >= 0``; it is passed in, not imported, because
        the page needs Flask (the ``labeling`` extra) and the labeling package builds on this one."""
        self.config = config
        self._start_labeling_page = labeling_page
        self.store: FeedbackStore | None = None
        self._executor = ThreadPoolExecutor(config.db_threads, thread_name_prefix="feedback-db")
        self._refresh_task: asyncio.Task | None = None
        self.labeling = None  # rlhf.labeling.web.LabelingWebServer when labeling_port >= 0

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def load(self, handle: ServerHandle) -> None:
        url = self.config.resolved_database_url()
        log.info("opening feedback store at %s", redact_url(url))
        self.store = await self._run(FeedbackStore.from_config, self.config)
        stats = await self._run(self.store.stats)
        self._set_gauges(stats)
        log.info(
            "feedback store ready: backend=%s schema=%s records=%s",
            stats.backend,
            await self._run(self.store.schema_revision),
            dict(stats.records_by_kind),
        )
        if self.config.labeling_port >= 0:
            if self._start_labeling_page is None:
                raise ValueError("labeling_port is set but no labeling page was given to the servicer")
            await self._run(self._start_labeling)
        self._refresh_task = asyncio.ensure_future(self._refresh_gauges())

    def _start_labeling(self) -> None:
        self.labeling = self._start_labeling_page(self.store, self.config)
        if self.config.port_file:  # launchers and tests find the page's port next to the gRPC one
            path = Path(self.config.port_file)
            ports = json.loads(path.read_text()) if path.exists() else {}
            ports["labeling_port"] = self.labeling.port
            atomic_write_text(path, json.dumps(ports))

    async def shutdown(self, handle: ServerHandle) -> None:
        if self._refresh_task:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        if self.labeling:
            await self._run(self.labeling.stop)
        if self.store:
            await self._run(self.store.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _set_gauges(self, stats: feedback_pb2.GetStatsResponse) -> None:
        STORE_SIZE.set(stats.size_bytes)
        for kind, count in stats.records_by_kind.items():
            RECORDS.labels(kind).set(count)

    async def _refresh_gauges(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_refresh_seconds)
            try:
                self._set_gauges(await self._run(self.store.stats))
                if self.labeling:
                    await self._run(self.labeling.refresh_depth)
            except Exception:  # a transient database error must not end the refresh loop
                log.warning("could not refresh store gauges", exc_info=True)

    # ---- writes ---------------------------------------------------------------------------------------

    async def _write(self, kind: str, fn, items) -> feedback_pb2.WriteResult:
        start = time.perf_counter()
        try:
            result = await self._run(fn, list(items))
        except ServiceError as exc:
            RECORDS_REJECTED.labels(kind, rejection_reason(exc)).inc(len(items))
            raise
        finally:
            WRITE_LATENCY.labels(kind).observe(time.perf_counter() - start)
        if kind != "labeler":
            count_written(kind, result.created)
        return result

    async def AddLabelers(self, request, context):
        result = await self._write("labeler", self.store.add_labelers, request.labelers)
        return feedback_pb2.AddLabelersResponse(result=result)

    async def AddPrompts(self, request, context):
        result = await self._write("prompt", self.store.add_prompts, request.prompts)
        return feedback_pb2.AddPromptsResponse(result=result)

    async def AddDemonstrations(self, request, context):
        result = await self._write("demonstration", self.store.add_demonstrations, request.demonstrations)
        return feedback_pb2.AddDemonstrationsResponse(result=result)

    async def AddComparisons(self, request, context):
        result = await self._write("comparison", self.store.add_comparisons, request.comparisons)
        return feedback_pb2.AddComparisonsResponse(result=result)

    async def AddRatings(self, request, context):
        result = await self._write("rating", self.store.add_ratings, request.ratings)
        return feedback_pb2.AddRatingsResponse(result=result)

    # ---- reads ----------------------------------------------------------------------------------------

    async def _read(self, op: str, fn, *args):
        start = time.perf_counter()
        try:
            return await self._run(fn, *args)
        finally:
            READ_LATENCY.labels(op).observe(time.perf_counter() - start)

    async def Export(self, request, context):
        state = await self._read("export", self.store.start_export, request)
        while not state.done:
            for message in await self._read("export", self.store.export_page, state):
                yield message

    async def GetStats(self, request, context):
        stats = await self._read("stats", self.store.stats)
        self._set_gauges(stats)
        return stats

    async def CreateSnapshot(self, request, context):
        snapshot = await self._read("create_snapshot", self.store.create_snapshot, request.snapshot)
        return feedback_pb2.CreateSnapshotResponse(snapshot=snapshot)

    async def GetSnapshot(self, request, context):
        snapshot = await self._read("get_snapshot", self.store.get_snapshot, request.name)
        return feedback_pb2.GetSnapshotResponse(snapshot=snapshot)

    async def ListSnapshots(self, request, context):
        snapshots = await self._read("list_snapshots", self.store.list_snapshots)
        return feedback_pb2.ListSnapshotsResponse(snapshots=snapshots)


def service_def(servicer: FeedbackServicer) -> ServiceDef:
    return ServiceDef(
        "rlhf.v1.FeedbackService", servicer, feedback_pb2_grpc.add_FeedbackServiceServicer_to_server
    )


def serve(config: FeedbackConfig, labeling_page: Callable | None = None) -> int:
    """Blocking: serve until SIGTERM/SIGINT (with the labeling page from ``labeling_page``, see
    :class:`FeedbackServicer`)."""
    servicer = FeedbackServicer(config, labeling_page)
    serve_forever(config, [service_def(servicer)], load=servicer.load, on_shutdown=servicer.shutdown)
    return 0
