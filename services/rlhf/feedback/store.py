"""The feedback store: one code path over SQLite (embedded default) and PostgreSQL (production).

Usable without a server (the CLI's direct mode, tests, the benchmark). Every write method takes a batch of
``rlhf.v1`` messages and is atomic: the whole batch is validated first, then written in one transaction,
committed durably (SQLite: WAL with synchronous=FULL; PostgreSQL: synchronous_commit) before it returns.

Idempotency: each record has an idempotency key, unique per kind. A record's id is derived from
(kind, key), so a retried batch returns the same ids and creates nothing new. A replayed key whose content
differs from the stored record is ALREADY_EXISTS (the batch writes nothing) — except for prompts sent
without a key, whose key is derived from the prompt itself: those are stored once and later copies return
the first one's id.

Writes are serialized (SQLite: BEGIN IMMEDIATE plus an in-process lock; PostgreSQL: a transaction-scoped
advisory lock), so ``seq`` order is commit order and an export cursor never skips a record that commits late.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from rlhf.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.feedback.schema import labelers, records, snapshot_records, snapshots
from rlhf.v1 import feedback_pb2

log = logging.getLogger("rlhf.feedback.store")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
WRITE_LOCK_KEY = 0x524C4846  # "RLHF": PostgreSQL advisory lock serializing record writes
MIGRATION_LOCK_KEY = 0x524C4847
_IN_CHUNK = 500  # ids per IN (...) clause
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def normalize_url(url: str) -> str:
    """Accept libpq-style URLs (postgresql://, postgres://) and use the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def redact_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


@dataclass
class _Row:
    """A validated record ready to insert."""

    index: int
    key: str
    id: str
    content_hash: str
    labeler_id: str | None
    prompt_id: str | None
    payload: dict
    derived_key: bool = False
    payload_json: str = ""  # canonical JSON of payload: hashed, then stored as is (encoded once)


@dataclass
class ExportState:
    """A validated export request being paged through (``seq`` of the last record sent)."""

    request: feedback_pb2.ExportRequest
    after_seq: int
    remaining: int | None  # None = no limit
    kinds: list[str] = field(default_factory=list)
    done: bool = False


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        if not _CURSOR.match(cursor):
            raise ValueError
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, seq = text.split(":")
        if version != "v1" or not seq.isdigit():
            raise ValueError
        return int(seq)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("cursor", f"{cursor[:40]!r} is not a cursor returned by Export") from None


def split_key(record_id: str, prompt_id: str | None, payload) -> str:
    """What a record's split is drawn from: its prompt (the prompt it carries, else the stored prompt's id),
    so that every record about one prompt lands in the same split and the eval split holds prompts the train
    split never saw; a record without a prompt is split by its own id."""
    if isinstance(payload, str):
        payload = json.loads(payload)
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    if prompt:
        return "prompt:" + rec.sha256_hex(rec.canonical_json(prompt))
    if prompt_id:
        return f"prompt-id:{prompt_id}"
    return record_id


def split_of(seed: int, record_id: str, eval_fraction: float) -> int:
    """SPLIT_EVAL or SPLIT_TRAIN, from a hash of (seed, record id): reproducible, independent of order."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return feedback_pb2.SPLIT_EVAL if u < eval_fraction else feedback_pb2.SPLIT_TRAIN


def snapshot_content_hash(ids_and_splits: Sequence[tuple[str, int]]) -> str:
    """SHA-256 over "id<TAB>split" lines sorted by id: the same records and splits give the same hash."""
    h = hashlib.sha256()
    for record_id, split in sorted(ids_and_splits):
        h.update(f"{record_id}\t{rec.SPLIT_NAMES[split]}\n".encode())
    return h.hexdigest()


def _chunks(items: Sequence, size: int = _IN_CHUNK):
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
        self.url = normalize_url(url)
        self.limits = limits or val.Limits()
        self.require_known_labelers = require_known_labelers
        self.export_page_size = export_page_size
        url_obj = sa.engine.make_url(self.url)
        self.backend = url_obj.get_backend_name()
        if self.backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.backend!r}: use sqlite:///FILE or postgresql://...")
        self._insert = sqlite_dialect.insert if self.backend == "sqlite" else pg_dialect.insert
        self._lock = threading.Lock() if self.backend == "sqlite" else None
        mark, json_mark = ("?", "?") if self.backend == "sqlite" else ("%s", "%s::jsonb")
        self._insert_records_sql = (
            "INSERT INTO records (id, kind, idempotency_key, content_hash, labeler_id, prompt_id, created_at_us, "
            f"payload) VALUES ({', '.join([mark] * 7)}, {json_mark}) ON CONFLICT DO NOTHING"
        )
        self._known_labelers: set[str] = set()
        if self.backend == "sqlite":
            self.sqlite_path = url_obj.database
            if not self.sqlite_path or self.sqlite_path == ":memory:":
                raise ValueError(
                    "use an SQLite file (sqlite:///path/feedback.db); in-memory databases are not durable"
                )
            Path(self.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(
                self.url,
                connect_args={"timeout": busy_timeout_seconds, "check_same_thread": False},
                pool_size=pool_size,
                max_overflow=pool_max_overflow,
            )
            _configure_sqlite(self.engine, busy_timeout_seconds)
        else:
            self.sqlite_path = None
            self.engine = sa.create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_max_overflow,
                pool_pre_ping=True,
            )
        self._write_engine = self.engine.execution_options(rlhf_write=True)
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
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._write_engine.begin() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write_tx(self):
        """A serialized write transaction; commits (durably) on success, rolls back on any error."""
        if self._lock is not None:
            with self._lock, self._write_engine.begin() as conn:
                yield conn
        else:
            with self._write_engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITE_LOCK_KEY})
                yield conn

    #: Public name for modules that write records together with their own rows (the labeling queue).
    write_tx = _write_tx

    # ---- writes ---------------------------------------------------------------------------------------

    def add_labelers(self, items: Sequence[feedback_pb2.Labeler]) -> feedback_pb2.WriteResult:
        """Add or update labelers by id (their details are descriptive: the latest write wins)."""
        val.check_batch(items, "labelers", self.limits)
        rows: dict[str, dict] = {}
        for i, labeler in enumerate(items):
            val.check_labeler(labeler, f"labelers[{i}]", self.limits)
            rows[labeler.id] = dict(
                id=labeler.id,
                display_name=labeler.display_name,
                kind=labeler.kind,
                metadata=dict(labeler.metadata),
                created_at_us=_now_us(),
            )
        with self._write_tx() as conn:
            existing = set()
            for chunk in _chunks(list(rows)):
                existing.update(
                    conn.execute(sa.select(labelers.c.id).where(labelers.c.id.in_(chunk))).scalars()
                )
            stmt = self._insert(labelers)
            stmt = stmt.on_conflict_do_update(
                index_elements=[labelers.c.id],
                set_=dict(
                    display_name=stmt.excluded.display_name,
                    kind=stmt.excluded.kind,
                    metadata=stmt.excluded.metadata,
                ),
            )
            conn.execute(stmt, list(rows.values()))
        self._known_labelers.update(rows)
        created = len(rows) - len(existing)
        return feedback_pb2.WriteResult(
            ids=[labeler.id for labeler in items], created=created, existing=len(items) - created
        )

    def add_prompts(self, items: Sequence[feedback_pb2.PromptRecord]) -> feedback_pb2.WriteResult:
        val.check_batch(items, "prompts", self.limits)
        rows = []
        for i, item in enumerate(items):
            val.check_prompt_record(item, f"prompts[{i}]", self.limits)
            payload = rec.prompt_record_payload(item)
            key = item.idempotency_key or rec.derived_prompt_key(payload["prompt"])
            rows.append(self._row(i, "prompt", key, payload, "", "", derived=not item.idempotency_key))
        return self._write("prompt", "prompts", rows)

    def add_demonstrations(self, items: Sequence[feedback_pb2.Demonstration]) -> feedback_pb2.WriteResult:
        return self._write("demonstration", "demonstrations", self.prepare("demonstration", items))

    def add_comparisons(self, items: Sequence[feedback_pb2.Comparison]) -> feedback_pb2.WriteResult:
        return self._write("comparison", "comparisons", self.prepare("comparison", items))

    def add_ratings(self, items: Sequence[feedback_pb2.Rating]) -> feedback_pb2.WriteResult:
        return self._write("rating", "ratings", self.prepare("rating", items))

    def prepare(self, kind: str, items: Sequence) -> list[_Row]:
        """Validate a batch of demonstrations, comparisons or ratings and build their rows (no I/O)."""
        field_name = kind + "s"
        val.check_batch(items, field_name, self.limits)
        check: Callable = {
            "demonstration": val.check_demonstration,
            "comparison": val.check_comparison,
            "rating": val.check_rating,
        }[kind]
        rows = []
        for i, item in enumerate(items):
            check(item, f"{field_name}[{i}]", self.limits)
            if kind == "demonstration":
                payload = rec.demonstration_payload(item)
            elif kind == "comparison":
                payload = rec.comparison_payload(item)
            else:
                payload = rec.rating_payload(item, val.rating_scale(item))
            rows.append(self._row(i, kind, item.idempotency_key, payload, item.labeler_id, item.prompt_id))
        return rows

    def _row(self, index, kind, key, payload, labeler_id, prompt_id, derived=False) -> _Row:
        if payload.get("prompt") is None:
            payload.pop("prompt", None)
        payload_json = rec.canonical_json(payload)
        return _Row(
            index=index,
            key=key,
            id=rec.record_id(kind, key),
            content_hash=rec.content_hash_of_json(payload_json, labeler_id, prompt_id),
            labeler_id=labeler_id or None,
            prompt_id=prompt_id or None,
            payload=payload,
            derived_key=derived,
            payload_json=payload_json,
        )

    def _write(self, kind: str, field_name: str, rows: list[_Row]) -> feedback_pb2.WriteResult:
        with self._write_tx() as conn:
            result, new_labelers = self.write_rows(conn, kind, field_name, rows)
        self._known_labelers.update(new_labelers)  # only once committed
        return result

    def write_rows(
        self, conn, kind: str, field_name: str, rows: list[_Row]
    ) -> tuple[feedback_pb2.WriteResult, list[str]]:
        """Insert rows from :meth:`prepare` inside the caller's write transaction (see :meth:`write_tx`).

        Returns the result and the labeler ids the transaction created; pass them to
        :meth:`note_labelers` once it has committed.
        """
        # Repeated keys inside one batch: the same content is one record, different content is an error.
        first: dict[str, _Row] = {}
        unique: list[_Row] = []
        for row in rows:
            prev = first.get(row.key)
            if prev is None:
                first[row.key] = row
                unique.append(row)
            elif prev.content_hash != row.content_hash and not row.derived_key:
                raise val.RecordError(
                    f"{field_name}[{row.index}].idempotency_key",
                    f"{row.key[:80]!r} repeats {field_name}[{prev.index}] with different content",
                    "idempotency_conflict",
                )
        now = _now_us()
        self._resolve_prompts(conn, field_name, unique)
        new_labelers = self._ensure_labelers(conn, field_name, unique, now)
        # Writes are serialized (see _write_tx), so the keys stored now are the keys stored at the insert.
        stored = self._stored_hashes(conn, kind, [r.key for r in unique])
        self._check_replays(field_name, [r for r in unique if r.key in stored], stored)
        new = [r for r in unique if r.key not in stored]
        if new:
            self._insert_records(conn, kind, field_name, new, now)
        created = len(new)
        result = feedback_pb2.WriteResult(
            ids=[first[r.key].id for r in rows], created=created, existing=len(rows) - created
        )
        return result, new_labelers

    def note_labelers(self, labeler_ids: Sequence[str]) -> None:
        """Remember labelers a committed :meth:`write_rows` transaction created."""
        self._known_labelers.update(labeler_ids)

    def _stored_hashes(self, conn, kind: str, keys: list[str]) -> dict[str, str]:
        """content_hash of the stored records of ``kind`` among ``keys``."""
        if self.backend == "postgresql":  # one short statement with an array (psycopg parses it once)
            sql = "SELECT idempotency_key, content_hash FROM records WHERE kind = %s AND idempotency_key = ANY(%s)"
            return dict(conn.exec_driver_sql(sql, (kind, keys)).all())
        stored: dict[str, str] = {}
        for chunk in _chunks(keys):
            q = sa.select(records.c.idempotency_key, records.c.content_hash).where(
                records.c.kind == kind, records.c.idempotency_key.in_(chunk)
            )
            stored.update(conn.execute(q).all())
        return stored

    def _check_replays(self, field_name: str, replayed: list[_Row], stored: dict[str, str]) -> None:
        for row in replayed:
            if stored[row.key] != row.content_hash and not row.derived_key:
                raise AlreadyExists(
                    f"{field_name}[{row.index}].idempotency_key: {row.key[:80]!r} is already stored "
                    f"(id {row.id}) with different content; use a new key for a new record"
                )

    def _insert_records(self, conn, kind: str, field_name: str, rows: list[_Row], now: int) -> None:
        """One executemany of a short prepared INSERT: the driver loops over the rows (sqlite3 in C, psycopg
        in a pipeline), instead of building and parsing one huge multi-row statement per batch."""
        params = [
            (
                r.id,
                kind,
                r.key,
                r.content_hash,
                r.labeler_id,
                r.prompt_id,
                now,
                r.payload_json or rec.canonical_json(r.payload),
            )
            for r in rows
        ]
        inserted = conn.exec_driver_sql(self._insert_records_sql, params).rowcount
        if inserted != len(rows):  # the keys were checked just before: only a colliding id can get here
            raise AlreadyExists(
                f"{field_name}: {len(rows) - inserted} record id(s) collide with stored records of another kind"
            )

    def _resolve_prompts(self, conn, field_name: str, rows: list[_Row]) -> None:
        """Check referenced prompt ids exist; copy the stored prompt into records sent without one."""
        wanted = sorted({r.prompt_id for r in rows if r.prompt_id})
        if not wanted:
            return
        found: dict[str, dict] = {}
        for chunk in _chunks(wanted):
            q = sa.select(records.c.id, records.c.payload).where(
                records.c.kind == "prompt", records.c.id.in_(chunk)
            )
            found.update((rid, payload["prompt"]) for rid, payload in conn.execute(q).all())
        for row in rows:
            if row.prompt_id and row.prompt_id not in found:
                raise val.RecordError(
                    f"{field_name}[{row.index}].prompt_id",
                    f"no stored prompt with id {row.prompt_id!r}",
                    "unknown_prompt",
                )
            if row.prompt_id and "prompt" not in row.payload:
                row.payload["prompt"] = found[row.prompt_id]
                row.payload_json = rec.canonical_json(row.payload)

    def _ensure_labelers(self, conn, field_name: str, rows: list[_Row], now: int) -> list[str]:
        """Check (require_known_labelers) or create the batch's labelers; returns the ids now known."""
        wanted = sorted({r.labeler_id for r in rows if r.labeler_id} - self._known_labelers)
        if not wanted:
            return []
        if self.require_known_labelers:
            known = set()
            for chunk in _chunks(wanted):
                known.update(conn.execute(sa.select(labelers.c.id).where(labelers.c.id.in_(chunk))).scalars())
            for row in rows:
                if (
                    row.labeler_id
                    and row.labeler_id not in known
                    and row.labeler_id not in self._known_labelers
                ):
                    raise val.RecordError(
                        f"{field_name}[{row.index}].labeler_id",
                        f"unknown labeler {row.labeler_id!r}: add it with AddLabelers first",
                        "unknown_labeler",
                    )
        else:
            values = [dict(id=i, display_name="", kind="", metadata={}, created_at_us=now) for i in wanted]
            conn.execute(self._insert(labelers).on_conflict_do_nothing(), values)
        return wanted

    # ---- reads ----------------------------------------------------------------------------------------

    def start_export(self, request: feedback_pb2.ExportRequest | None = None, **kw) -> ExportState:
        """Validate an export request (or build one from ``make_export_request`` keywords)."""
        request = request if request is not None else rec.make_export_request(**kw)
        val.check_filter(request.filter, "filter")
        if request.split and not request.snapshot:
            raise InvalidArgument("split", "only meaningful with a snapshot")
        if request.split not in (0, feedback_pb2.SPLIT_TRAIN, feedback_pb2.SPLIT_EVAL):
            raise InvalidArgument("split", f"{request.split} is not a split")
        if request.snapshot:
            val.check_snapshot_name(request.snapshot, "snapshot")
            with self.engine.connect() as conn:
                exists = conn.execute(
                    sa.select(snapshots.c.name).where(snapshots.c.name == request.snapshot)
                ).first()
            if not exists:
                raise NotFound(f"snapshot: no snapshot named {request.snapshot[:128]!r}")
        return ExportState(
            request=request,
            after_seq=decode_cursor(request.cursor) if request.cursor else 0,
            remaining=request.limit or None,
            kinds=[rec.KIND_FROM_ENUM[k] for k in request.filter.kinds],
        )

    def export_page(self, state: ExportState) -> list[feedback_pb2.ExportResponse]:
        """The next page of records after ``state.after_seq``; advances the state. Empty when done."""
        if state.done:
            return []
        size = (
            self.export_page_size if state.remaining is None else min(self.export_page_size, state.remaining)
        )
        request = state.request
        cols = [
            records.c.seq,
            records.c.id,
            records.c.kind,
            records.c.idempotency_key,
            records.c.labeler_id,
            records.c.prompt_id,
            records.c.created_at_us,
            records.c.payload,
        ]
        if request.snapshot:
            q = sa.select(*cols, snapshot_records.c.split).join(
                snapshot_records,
                sa.and_(
                    snapshot_records.c.seq == records.c.seq,
                    snapshot_records.c.snapshot_name == request.snapshot,
                ),
            )
            if request.split:
                q = q.where(snapshot_records.c.split == request.split)
        else:
            q = sa.select(*cols, sa.literal(0).label("split"))
        q = _apply_filter(q, request.filter).where(records.c.seq > state.after_seq)
        q = q.order_by(records.c.seq).limit(size)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        out = []
        for seq, rid, kind, key, labeler_id, prompt_id, created_us, payload, split in rows:
            message = rec.record_message(
                kind,
                payload,
                id=rid,
                idempotency_key=key,
                labeler_id=labeler_id,
                prompt_id=prompt_id,
                created_at_us=created_us,
            )
            out.append(feedback_pb2.ExportResponse(**{kind: message}, cursor=encode_cursor(seq), split=split))
        if rows:
            state.after_seq = rows[-1][0]
        if state.remaining is not None:
            state.remaining -= len(rows)
        state.done = len(rows) < size or state.remaining == 0
        return out

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
        with self.engine.connect() as conn:
            by_kind = dict(
                conn.execute(sa.select(records.c.kind, sa.func.count()).group_by(records.c.kind)).all()
            )
            # Prompt records never have a labeler (add_prompts stores none), so this counts judgments; without
            # a condition on kind the labeler_id index covers the query (40x faster at 100k records).
            by_labeler = dict(
                conn.execute(
                    sa.select(records.c.labeler_id, sa.func.count())
                    .where(records.c.labeler_id.is_not(None))
                    .group_by(records.c.labeler_id)
                ).all()
            )
            num_labelers = conn.execute(sa.select(sa.func.count()).select_from(labelers)).scalar_one()
            num_snapshots = conn.execute(sa.select(sa.func.count()).select_from(snapshots)).scalar_one()
            size = self._size_bytes(conn)
        return feedback_pb2.GetStatsResponse(
            records_by_kind={k: by_kind.get(k, 0) for k in rec.KINDS},
            records_by_labeler=by_labeler,
            num_labelers=num_labelers,
            num_snapshots=num_snapshots,
            size_bytes=size,
            backend=self.backend,
        )

    def _size_bytes(self, conn) -> int:
        if self.backend == "postgresql":
            return int(conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one())
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += Path(self.sqlite_path + suffix).stat().st_size
            except OSError:
                pass
        return total

    # ---- snapshots ------------------------------------------------------------------------------------

    def create_snapshot(self, snapshot: feedback_pb2.Snapshot) -> feedback_pb2.Snapshot:
        """Freeze the records matching ``snapshot.filter`` under ``snapshot.name`` with a train/eval split.

        The same name with the same filter, eval_fraction and seed returns the existing snapshot;
        different parameters are ALREADY_EXISTS. A filter that matches nothing is FAILED_PRECONDITION.
        """
        val.check_snapshot_request(snapshot, "snapshot", self.limits)
        params = {
            "filter": _filter_dict(snapshot.filter),
            "eval_fraction": snapshot.eval_fraction,
            "seed": str(snapshot.seed),
        }
        params_hash = rec.sha256_hex(rec.canonical_json(params))
        with self._write_tx() as conn:
            row = (
                conn.execute(sa.select(snapshots).where(snapshots.c.name == snapshot.name)).mappings().first()
            )
            if row is not None:
                if row["params_hash"] != params_hash:
                    raise AlreadyExists(
                        f"snapshot.name: {snapshot.name!r} exists with different parameters {row['params']}"
                    )
                return _snapshot_message(row)
            q = _apply_filter(
                sa.select(
                    records.c.seq, records.c.id, records.c.kind, records.c.prompt_id, records.c.payload
                ),
                snapshot.filter,
            )
            members, splits = [], []
            for seq, rid, kind, prompt_id, payload in conn.execute(q.order_by(records.c.seq)):
                members.append((seq, rid, kind))
                key = split_key(rid, prompt_id, payload)
                splits.append(split_of(snapshot.seed, key, snapshot.eval_fraction))
            if not members:
                raise FailedPrecondition("snapshot.filter: no records match; nothing to freeze")
            by_kind: dict[str, int] = {}
            for _, _, kind in members:
                by_kind[kind] = by_kind.get(kind, 0) + 1
            num_eval = sum(1 for s in splits if s == feedback_pb2.SPLIT_EVAL)
            values = dict(
                name=snapshot.name,
                params=params,
                params_hash=params_hash,
                description=snapshot.description,
                records_by_kind=by_kind,
                num_train=len(members) - num_eval,
                num_eval=num_eval,
                content_hash=snapshot_content_hash(
                    [(rid, s) for (_, rid, _), s in zip(members, splits, strict=True)]
                ),
                created_at_us=_now_us(),
            )
            conn.execute(snapshots.insert(), values)
            member_rows = [
                dict(snapshot_name=snapshot.name, seq=seq, split=s)
                for (seq, _, _), s in zip(members, splits, strict=True)
            ]
            for chunk in _chunks(member_rows, 5000):
                conn.execute(snapshot_records.insert(), chunk)
        return _snapshot_message(values)

    def get_snapshot(self, name: str) -> feedback_pb2.Snapshot:
        val.check_snapshot_name(name, "name")  # (PostgreSQL cannot even compare a name with a NUL in it)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(snapshots).where(snapshots.c.name == name)).mappings().first()
        if row is None:
            raise NotFound(f"name: no snapshot named {name[:128]!r}")
        return _snapshot_message(row)

    def list_snapshots(self) -> list[feedback_pb2.Snapshot]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(snapshots).order_by(snapshots.c.created_at_us.desc(), snapshots.c.name)
            ).mappings()
            return [_snapshot_message(r) for r in rows]


def _now_us() -> int:
    return time.time_ns() // 1000


def _configure_sqlite(engine: sa.Engine, busy_timeout_seconds: float) -> None:
    """WAL + synchronous=FULL (a commit is on disk when it returns); explicit BEGIN [IMMEDIATE]."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (pysqlite's implicit one is lazy)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        # IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading a read lock.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rlhf_write") else "BEGIN")


def _apply_filter(q, record_filter: feedback_pb2.RecordFilter):
    if record_filter.kinds:
        q = q.where(records.c.kind.in_([rec.KIND_FROM_ENUM[k] for k in record_filter.kinds]))
    if record_filter.labeler_ids:
        q = q.where(records.c.labeler_id.in_(list(record_filter.labeler_ids)))
    if record_filter.HasField("created_after"):
        q = q.where(records.c.created_at_us >= rec.timestamp_to_us(record_filter.created_after))
    if record_filter.HasField("created_before"):
        q = q.where(records.c.created_at_us < rec.timestamp_to_us(record_filter.created_before))
    return q


def _filter_dict(record_filter: feedback_pb2.RecordFilter) -> dict:
    out: dict = {}
    if record_filter.kinds:
        out["kinds"] = sorted(rec.KIND_FROM_ENUM[k] for k in set(record_filter.kinds))
    if record_filter.labeler_ids:
        out["labeler_ids"] = sorted(set(record_filter.labeler_ids))
    if record_filter.HasField("created_after"):
        out["created_after_us"] = rec.timestamp_to_us(record_filter.created_after)
    if record_filter.HasField("created_before"):
        out["created_before_us"] = rec.timestamp_to_us(record_filter.created_before)
    return out


def _snapshot_message(row) -> feedback_pb2.Snapshot:
    params = row["params"]
    f = params["filter"]
    return feedback_pb2.Snapshot(
        name=row["name"],
        filter=rec.make_filter(
            f.get("kinds", ()),
            f.get("labeler_ids", ()),
            f.get("created_after_us"),
            f.get("created_before_us"),
        ),
        eval_fraction=params["eval_fraction"],
        seed=int(params["seed"]),
        records_by_kind=row["records_by_kind"],
        num_train=row["num_train"],
        num_eval=row["num_eval"],
        content_hash=row["content_hash"],
        created_at=rec.timestamp_from_us(row["created_at_us"]),
        description=row["description"],
    )
