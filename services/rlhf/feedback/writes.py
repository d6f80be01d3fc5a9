"""Record writes: validate a batch into rows, then insert it idempotently inside a write transaction.

Idempotency: each record has an idempotency key, unique per kind, and an id derived from (kind, key), so a
retried batch returns the same ids and creates nothing new. A replayed key whose content differs from the stored
record is ALREADY_EXISTS (the batch writes nothing) — except for prompts sent without a key, whose key is derived
from the prompt itself: those are stored once and later copies return the first one's id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from rlhf.core.errors import AlreadyExists
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.feedback.schema import labelers, records
from rlhf.v1 import feedback_pb2

IN_CHUNK = 500  # ids per IN (...) clause


@dataclass
class PreparedRecord:
    """A validated record ready to insert (see :meth:`RecordWriter.prepare`)."""

    index: int
    key: str
    id: str
    content_hash: str
    labeler_id: str | None
    prompt_id: str | None
    payload: dict
    derived_key: bool = False
    payload_json: str = ""  # canonical JSON of payload: hashed, then stored as is (encoded once)


def chunks(items: Sequence, size: int = IN_CHUNK):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def now_us() -> int:
    return time.time_ns() // 1000


def dialect_insert(backend: str) -> Callable:
    """``insert()`` of the backend's dialect (with ``on_conflict_do_nothing`` / ``on_conflict_do_update``)."""
    return sqlite_dialect.insert if backend == "sqlite" else pg_dialect.insert


def make_row(index, kind, key, payload, labeler_id, prompt_id, derived=False) -> PreparedRecord:
    if payload.get("prompt") is None:
        payload.pop("prompt", None)
    payload_json = rec.canonical_json(payload)
    return PreparedRecord(
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


class RecordWriter:
    """Validation and idempotent inserts of records; remembers the labelers known to exist."""

    def __init__(self, backend: str, limits: val.Limits, require_known_labelers: bool):
        self.backend = backend
        self.limits = limits
        self.require_known_labelers = require_known_labelers
        self.insert = dialect_insert(backend)
        self.known_labelers: set[str] = set()
        mark, json_mark = ("?", "?") if backend == "sqlite" else ("%s", "%s::jsonb")
        self._insert_records_sql = (
            "INSERT INTO records (id, kind, idempotency_key, content_hash, labeler_id, prompt_id, created_at_us, "
            f"payload) VALUES ({', '.join([mark] * 7)}, {json_mark}) ON CONFLICT DO NOTHING"
        )

    def prepare_prompts(self, items: Sequence[feedback_pb2.PromptRecord]) -> list[PreparedRecord]:
        val.check_batch(items, "prompts", self.limits)
        rows = []
        for i, item in enumerate(items):
            val.check_prompt_record(item, f"prompts[{i}]", self.limits)
            payload = rec.prompt_record_payload(item)
            key = item.idempotency_key or rec.derived_prompt_key(payload["prompt"])
            rows.append(make_row(i, "prompt", key, payload, "", "", derived=not item.idempotency_key))
        return rows

    def prepare(self, kind: str, items: Sequence) -> list[PreparedRecord]:
        """Validate a batch of demonstrations, comparisons or ratings and build their rows (no I/O)."""
        field_name = kind + "s"
        val.check_batch(items, field_name, self.limits)
        rows = []
        for i, item in enumerate(items):
            val.CHECK_RECORD[kind](item, f"{field_name}[{i}]", self.limits)
            if kind == "demonstration":
                payload = rec.demonstration_payload(item)
            elif kind == "comparison":
                payload = rec.comparison_payload(item)
            else:
                payload = rec.rating_payload(item, val.rating_scale(item))
            rows.append(make_row(i, kind, item.idempotency_key, payload, item.labeler_id, item.prompt_id))
        return rows

    def write(
        self, conn: sa.Connection, kind: str, rows: list[PreparedRecord]
    ) -> tuple[feedback_pb2.WriteResult, list[str]]:
        """Insert prepared rows inside the caller's serialized write transaction.

        Returns the result and the labeler ids the transaction created (known once it commits).
        """
        field_name = kind + "s"
        first, unique = _first_of_each_key(field_name, rows)
        now = now_us()
        self._resolve_prompts(conn, field_name, unique)
        new_labelers = self._ensure_labelers(conn, field_name, unique, now)
        # Writes are serialized, so the keys stored now are the keys stored at the insert.
        stored = self._stored_hashes(conn, kind, [r.key for r in unique])
        _check_replays(field_name, [r for r in unique if r.key in stored], stored)
        new = [r for r in unique if r.key not in stored]
        if new:
            self._insert_records(conn, kind, field_name, new, now)
        created = len(new)
        result = feedback_pb2.WriteResult(
            ids=[first[r.key].id for r in rows], created=created, existing=len(rows) - created
        )
        return result, new_labelers

    def _stored_hashes(self, conn, kind: str, keys: list[str]) -> dict[str, str]:
        """content_hash of the stored records of ``kind`` among ``keys``."""
        if self.backend == "postgresql":  # one short statement with an array (psycopg parses it once)
            sql = "SELECT idempotency_key, content_hash FROM records WHERE kind = %s AND idempotency_key = ANY(%s)"
            return dict(conn.exec_driver_sql(sql, (kind, keys)).all())
        stored: dict[str, str] = {}
        for chunk in chunks(keys):
            q = sa.select(records.c.idempotency_key, records.c.content_hash).where(
                records.c.kind == kind, records.c.idempotency_key.in_(chunk)
            )
            stored.update(conn.execute(q).all())
        return stored

    def _insert_records(self, conn, kind: str, field_name: str, rows: list[PreparedRecord], now: int) -> None:
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

    def _resolve_prompts(self, conn, field_name: str, rows: list[PreparedRecord]) -> None:
        """Check referenced prompt ids exist; copy the stored prompt into records sent without one."""
        wanted = sorted({r.prompt_id for r in rows if r.prompt_id})
        if not wanted:
            return
        found: dict[str, dict] = {}
        for chunk in chunks(wanted):
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

    def _ensure_labelers(self, conn, field_name: str, rows: list[PreparedRecord], now: int) -> list[str]:
        """Check (require_known_labelers) or create the batch's labelers; returns the ids now known."""
        wanted = sorted({r.labeler_id for r in rows if r.labeler_id} - self.known_labelers)
        if not wanted:
            return []
        if self.require_known_labelers:
            known = set()
            for chunk in chunks(wanted):
                known.update(conn.execute(sa.select(labelers.c.id).where(labelers.c.id.in_(chunk))).scalars())
            for row in rows:
                if row.labeler_id and row.labeler_id not in known | self.known_labelers:
                    raise val.RecordError(
                        f"{field_name}[{row.index}].labeler_id",
                        f"unknown labeler {row.labeler_id!r}: add it with AddLabelers first",
                        "unknown_labeler",
                    )
        else:
            values = [dict(id=i, display_name="", kind="", metadata={}, created_at_us=now) for i in wanted]
            conn.execute(self.insert(labelers).on_conflict_do_nothing(), values)
        return wanted

    def prepare_labelers(self, items: Sequence[feedback_pb2.Labeler]) -> dict[str, dict]:
        """Validate a batch of labelers; their rows by id (the last of a repeated id wins)."""
        val.check_batch(items, "labelers", self.limits)
        rows: dict[str, dict] = {}
        for i, labeler in enumerate(items):
            val.check_labeler(labeler, f"labelers[{i}]", self.limits)
            rows[labeler.id] = dict(
                id=labeler.id,
                display_name=labeler.display_name,
                kind=labeler.kind,
                metadata=dict(labeler.metadata),
                created_at_us=now_us(),
            )
        return rows

    def write_labelers(self, conn, rows: dict[str, dict]) -> int:
        """Add or update labelers by id (their details are descriptive: the latest write wins); returns how
        many are new."""
        existing = set()
        for chunk in chunks(list(rows)):
            existing.update(conn.execute(sa.select(labelers.c.id).where(labelers.c.id.in_(chunk))).scalars())
        stmt = self.insert(labelers)
        stmt = stmt.on_conflict_do_update(
            index_elements=[labelers.c.id],
            set_=dict(
                display_name=stmt.excluded.display_name,
                kind=stmt.excluded.kind,
                metadata=stmt.excluded.metadata,
            ),
        )
        conn.execute(stmt, list(rows.values()))
        return len(rows) - len(existing)


def _first_of_each_key(field_name: str, rows: list[PreparedRecord]):
    """Repeated keys inside one batch: the same content is one record, different content is an error."""
    first: dict[str, PreparedRecord] = {}
    unique: list[PreparedRecord] = []
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
    return first, unique


def _check_replays(field_name: str, replayed: list[PreparedRecord], stored: dict[str, str]) -> None:
    for row in replayed:
        if stored[row.key] != row.content_hash and not row.derived_key:
            raise AlreadyExists(
                f"{field_name}[{row.index}].idempotency_key: {row.key[:80]!r} is already stored "
                f"(id {row.id}) with different content; use a new key for a new record"
            )
