"""Snapshots: the records matching a filter frozen under a name, each in a reproducible train/eval split."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa

from rlhf.core.errors import AlreadyExists, FailedPrecondition, NotFound
from rlhf.feedback import records as rec
from rlhf.feedback import validation as val
from rlhf.feedback.reads import apply_filter
from rlhf.feedback.schema import records, snapshot_records, snapshots
from rlhf.feedback.writes import chunks, now_us
from rlhf.v1 import feedback_pb2


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


def create_snapshot(
    conn: sa.Connection, snapshot: feedback_pb2.Snapshot, limits: val.Limits
) -> feedback_pb2.Snapshot:
    """Freeze the records matching ``snapshot.filter`` under ``snapshot.name`` with a train/eval split, inside
    the caller's write transaction.

    The same name with the same filter, eval_fraction and seed returns the existing snapshot;
    different parameters are ALREADY_EXISTS. A filter that matches nothing is FAILED_PRECONDITION.
    """
    val.check_snapshot_request(snapshot, "snapshot", limits)
    params = {
        "filter": _filter_dict(snapshot.filter),
        "eval_fraction": snapshot.eval_fraction,
        "seed": str(snapshot.seed),
    }
    params_hash = rec.sha256_hex(rec.canonical_json(params))
    row = conn.execute(sa.select(snapshots).where(snapshots.c.name == snapshot.name)).mappings().first()
    if row is not None:
        if row["params_hash"] != params_hash:
            raise AlreadyExists(
                f"snapshot.name: {snapshot.name!r} exists with different parameters {row['params']}"
            )
        return _snapshot_message(row)
    members, splits = _members_and_splits(conn, snapshot)
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
        created_at_us=now_us(),
    )
    conn.execute(snapshots.insert(), values)
    member_rows = [
        dict(snapshot_name=snapshot.name, seq=seq, split=s)
        for (seq, _, _), s in zip(members, splits, strict=True)
    ]
    for chunk in chunks(member_rows, 5000):
        conn.execute(snapshot_records.insert(), chunk)
    return _snapshot_message(values)


def _members_and_splits(conn, snapshot: feedback_pb2.Snapshot) -> tuple[list[tuple], list[int]]:
    """(seq, id, kind) of each record the snapshot's filter matches, in ``seq`` order, and each one's split."""
    q = apply_filter(
        sa.select(records.c.seq, records.c.id, records.c.kind, records.c.prompt_id, records.c.payload),
        snapshot.filter,
    )
    members, splits = [], []
    for seq, rid, kind, prompt_id, payload in conn.execute(q.order_by(records.c.seq)):
        members.append((seq, rid, kind))
        splits.append(split_of(snapshot.seed, split_key(rid, prompt_id, payload), snapshot.eval_fraction))
    if not members:
        raise FailedPrecondition("snapshot.filter: no records match; nothing to freeze")
    return members, splits


def get_snapshot(conn: sa.Connection, name: str) -> feedback_pb2.Snapshot:
    val.check_snapshot_name(name, "name")  # (PostgreSQL cannot even compare a name with a NUL in it)
    row = conn.execute(sa.select(snapshots).where(snapshots.c.name == name)).mappings().first()
    if row is None:
        raise NotFound(f"name: no snapshot named {name[:128]!r}")
    return _snapshot_message(row)


def list_snapshots(conn: sa.Connection) -> list[feedback_pb2.Snapshot]:
    rows = conn.execute(
        sa.select(snapshots).order_by(snapshots.c.created_at_us.desc(), snapshots.c.name)
    ).mappings()
    return [_snapshot_message(r) for r in rows]


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
