"""The feedback store: one code path over SQLite (embedded default) and PostgreSQL (production).

Usable without a server (the CLI's direct mode, tests, the benchmark). Every write method takes a batch of
``rlhf.v1`` messages and is atomic: the whole batch is validated first, then written in one transaction,
committed durably (SQLite: WAL with synchronous=FULL; PostgreSQL: synchronous_commit) before it returns.
Idempotency and replays: see :mod:`rlhf.feedback.writes`.

Writes are serialized (SQLite: BEGIN IMMEDIATE plus an in-process lock; PostgreSQL: a transaction-scoped
advisory lock), so ``seq`` order is commit order and an export cursor never skips a record that commits late.

Modules that keep their own tables in the same database (the labeling queue) use the public transaction API:
:meth:`FeedbackStore.read_connection`, :meth:`FeedbackStore.write_transaction` and
:meth:`FeedbackStore.prepare`, so their rows and the records they write commit together.

The pieces: :mod:`~rlhf.feedback.engine` (connection, migrations, transactions), :mod:`~rlhf.feedback.writes`,
:mod:`~rlhf.feedback.reads`, :mod:`~rlhf.feedback.snapshots`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import sqlalchemy as sa

from rlhf.feedback import reads, snapshots
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.feedback.engine import Database
from rlhf.feedback.reads import ExportState
from rlhf.feedback.writes import PreparedRecord, RecordWriter
from rlhf.v1 import feedback_pb2

log = logging.getLogger("rlhf.feedback.store")


@dataclass
class WriteTransaction:
    """An open write transaction of a :class:`FeedbackStore` (see :meth:`FeedbackStore.write_transaction`).

    Everything executed through it commits together, durably, when the ``with`` block ends, or not at all.
    """

    connection: sa.Connection
    insert: Callable  # the backend dialect's insert(): on_conflict_do_nothing(), returning(), ...
    _writer: RecordWriter
    new_labelers: list[str] = field(default_factory=list)

    def execute(self, statement, parameters=None) -> sa.CursorResult:
        """Execute a SQLAlchemy statement in this transaction."""
        return self.connection.execute(statement, parameters)

    def write_records(self, kind: str, rows: list[PreparedRecord]) -> feedback_pb2.WriteResult:
        """Store records from :meth:`FeedbackStore.prepare`, idempotently, as ``add_<kind>s`` would."""
        result, created = self._writer.write(self.connection, kind, rows)
        self.new_labelers.extend(created)
        return result


class FeedbackStore:
    """Prompts, demonstrations, comparisons, ratings, labelers and snapshots in one SQL database."""

    def __init__(
        self,
        url: str,
        *,
        limits: val.Limits | None = None,
        require_known_labelers: bool = False,
        pool_size: int = 5,
        pool_max_overflow: int = 5,
        busy_timeout_seconds: float = 30.0,
        export_page_size: int = 1000,
        migrate: bool = True,
    ):
        self._db = Database(
            url,
            pool_size=pool_size,
            pool_max_overflow=pool_max_overflow,
            busy_timeout_seconds=busy_timeout_seconds,
        )
        self.url = self._db.url
        self.backend = self._db.backend
        self.sqlite_path = self._db.sqlite_path
        self.engine = self._db.engine  # for tests and tools that inspect the database
        self.limits = limits or val.Limits()
        self.require_known_labelers = require_known_labelers
        self.export_page_size = export_page_size
        self._writer = RecordWriter(self.backend, self.limits, require_known_labelers)
        if migrate:
            self.migrate()

    @classmethod
    def from_config(cls, config) -> FeedbackStore:
        """A store for a :class:`rlhf.feedback.config.FeedbackConfig`."""
        return cls(
            config.resolved_database_url(),
            limits=val.Limits(max_text_chars=config.max_text_chars, max_batch_size=config.max_batch_size),
            require_known_labelers=config.require_known_labelers,
            pool_size=config.pool_size,
            pool_max_overflow=config.pool_max_overflow,
            busy_timeout_seconds=config.busy_timeout_seconds,
            export_page_size=config.export_page_size,
        )

    # ---- lifecycle ------------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to run from several replicas at once)."""
        self._db.migrate()

    def schema_revision(self) -> str | None:
        with self.read_connection() as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transactions (public: for modules with their own tables in this database) ---------------------

    def read_connection(self) -> sa.Connection:
        """A connection for reads (``with store.read_connection() as conn: conn.execute(...)``)."""
        return self.engine.connect()

    @contextmanager
    def write_transaction(self, *, serialize: bool = True) -> Iterator[WriteTransaction]:
        """A write transaction: commits durably when the ``with`` block ends, rolls back on any error.

        Serialized with every other write of the store (SQLite: BEGIN IMMEDIATE and an in-process lock;
        PostgreSQL: an advisory lock). ``serialize=False`` skips the lock on PostgreSQL, for callers that
        lock the rows they change (``SELECT ... FOR UPDATE``) and write no records; SQLite always serializes.
        """
        with self._write_tx(serialize) as conn:
            tx = WriteTransaction(conn, self._writer.insert, self._writer)
            yield tx
        self._writer.known_labelers.update(tx.new_labelers)  # only once committed

    @contextmanager
    def _write_tx(self, serialize: bool = True) -> Iterator[sa.Connection]:
        with self._db.write_tx(serialize=serialize) as conn:
            yield conn

    def prepare(self, kind: str, items: Sequence) -> list[PreparedRecord]:
        """Validate a batch of demonstrations, comparisons or ratings into rows for
        :meth:`WriteTransaction.write_records` (no I/O; raises the errors ``add_<kind>s`` would)."""
        return self._writer.prepare(kind, items)

    # ---- writes ---------------------------------------------------------------------------------------

    def add_labelers(self, items: Sequence[feedback_pb2.Labeler]) -> feedback_pb2.WriteResult:
        """Add or update labelers by id (their details are descriptive: the latest write wins)."""
        rows = self._writer.prepare_labelers(items)
        with self._write_tx() as conn:
            created = self._writer.write_labelers(conn, rows)
        self._writer.known_labelers.update(rows)
        return feedback_pb2.WriteResult(
            ids=[labeler.id for labeler in items], created=created, existing=len(items) - created
        )

    def add_prompts(self, items: Sequence[feedback_pb2.PromptRecord]) -> feedback_pb2.WriteResult:
        return self._write("prompt", self._writer.prepare_prompts(items))

    def add_demonstrations(self, items: Sequence[feedback_pb2.Demonstration]) -> feedback_pb2.WriteResult:
        return self._write("demonstration", self.prepare("demonstration", items))

    def add_comparisons(self, items: Sequence[feedback_pb2.Comparison]) -> feedback_pb2.WriteResult:
        return self._write("comparison", self.prepare("comparison", items))

    def add_ratings(self, items: Sequence[feedback_pb2.Rating]) -> feedback_pb2.WriteResult:
        return self._write("rating", self.prepare("rating", items))

    def _write(self, kind: str, rows: list[PreparedRecord]) -> feedback_pb2.WriteResult:
        with self.write_transaction() as tx:
            return tx.write_records(kind, rows)

    # ---- reads ----------------------------------------------------------------------------------------

    def start_export(self, request: feedback_pb2.ExportRequest | None = None, **kw) -> ExportState:
        """Validate an export request (or build one from ``make_export_request`` keywords)."""
        request = request if request is not None else rec.make_export_request(**kw)
        with self.read_connection() as conn:
            return reads.start_export(conn, request)

    def export_page(self, state: ExportState) -> list[feedback_pb2.ExportResponse]:
        """The next page of records after ``state.after_seq``; advances the state. Empty when done."""
        if state.done:
            return []
        with self.read_connection() as conn:
            return reads.export_page(conn, state, self.export_page_size)

    def export(
        self, request: feedback_pb2.ExportRequest | None = None, **kw
    ) -> Iterator[feedback_pb2.ExportResponse]:
        """Records matching the request in ``seq`` order, one page per query."""
        state = self.start_export(request, **kw)
        while True:
            page = self.export_page(state)
            yield from page
            if state.done:
                return

    def stats(self) -> feedback_pb2.GetStatsResponse:
        with self.read_connection() as conn:
            return reads.stats(conn, self.backend, self.sqlite_path)

    def has_labeler(self, labeler_id: str) -> bool:
        """Whether a labeler with this id is stored."""
        with self.read_connection() as conn:
            return reads.has_labeler(conn, labeler_id)

    # ---- snapshots ------------------------------------------------------------------------------------

    def create_snapshot(self, snapshot: feedback_pb2.Snapshot) -> feedback_pb2.Snapshot:
        """Freeze the records matching ``snapshot.filter`` (see :func:`rlhf.feedback.snapshots.create_snapshot`)."""
        with self._write_tx() as conn:
            return snapshots.create_snapshot(conn, snapshot, self.limits)

    def get_snapshot(self, name: str) -> feedback_pb2.Snapshot:
        with self.read_connection() as conn:
            return snapshots.get_snapshot(conn, name)

    def list_snapshots(self) -> list[feedback_pb2.Snapshot]:
        with self.read_connection() as conn:
            return snapshots.list_snapshots(conn)
