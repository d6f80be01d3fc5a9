"""The store's tables (SQLAlchemy Core). Alembic migrations in ``migrations/versions`` create and evolve them;
``tests/feedback/test_migrations.py`` checks that the migrated database matches these definitions.

One ``records`` table holds every kind: a monotonically increasing ``seq`` orders exports and cursors, common
columns carry what filters and constraints need, and ``payload`` holds the kind's content (see records.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = sa.MetaData(naming_convention=NAMING)

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid); PostgreSQL gets a BIGSERIAL.
Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

records = sa.Table(
    "records",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("idempotency_key", sa.String(256), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("labeler_id", sa.String(128), nullable=True),
    sa.Column("prompt_id", sa.String(64), nullable=True),
    sa.Column("created_at_us", sa.BigInteger(), nullable=False),
    sa.Column("payload", Json, nullable=False),
    sa.UniqueConstraint("kind", "idempotency_key"),
    sa.UniqueConstraint("id"),
    sa.Index(None, "labeler_id"),
    sa.Index(None, "created_at_us"),
)

labelers = sa.Table(
    "labelers",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("metadata", Json, nullable=False),
    sa.Column("created_at_us", sa.BigInteger(), nullable=False),
)

snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("params", Json, nullable=False),
    sa.Column("params_hash", sa.String(64), nullable=False),
    sa.Column("description", sa.Text(), nullable=False),
    sa.Column("records_by_kind", Json, nullable=False),
    sa.Column("num_train", sa.BigInteger(), nullable=False),
    sa.Column("num_eval", sa.BigInteger(), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("created_at_us", sa.BigInteger(), nullable=False),
)

snapshot_records = sa.Table(
    "snapshot_records",
    metadata,
    sa.Column("snapshot_name", sa.String(128), sa.ForeignKey("snapshots.name"), primary_key=True),
    sa.Column("seq", sa.BigInteger(), sa.ForeignKey("records.seq"), primary_key=True),
    sa.Column("split", sa.SmallInteger(), nullable=False),
)

# ---- labeling queue (migration 0002) ---------------------------------------------------------------------
# A task is a prompt with 2+ responses to compare (kind "comparison") or 1 to rate (kind "rating"); it wants
# ``redundancy`` judgments from different labelers. ``seq`` is the queue order (first enqueued, first served).
labeling_tasks = sa.Table(
    "labeling_tasks",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(256), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("prompt_id", sa.String(64), nullable=True),
    sa.Column("payload", Json, nullable=False),
    sa.Column("redundancy", sa.Integer(), nullable=False),
    sa.Column("judgments", sa.Integer(), nullable=False),
    sa.Column("source", sa.String(256), nullable=False),
    sa.Column("created_at_us", sa.BigInteger(), nullable=False),
    sa.UniqueConstraint("id"),
    sa.UniqueConstraint("idempotency_key"),
    # The open tasks in queue order (migration 0003): the next-task query starts at the first one instead of
    # walking past every finished task. Queries must repeat the predicate as written (SQLite matches it as is).
    sa.Index(
        "ix_labeling_tasks_open_seq",
        "seq",
        sqlite_where=sa.text("judgments < redundancy"),
        postgresql_where=sa.text("judgments < redundancy"),
    ),
)

# One row per (task, labeler) ever handed out: a labeler never gets a task twice. status is "assigned" (lease
# until lease_expires_us), "done" (record_id holds the judgment; choice/score summarise it for agreement),
# "skipped" or "expired" (the lease ran out and the slot went to someone else).
labeling_assignments = sa.Table(
    "labeling_assignments",
    metadata,
    sa.Column("task_id", sa.String(64), sa.ForeignKey("labeling_tasks.id"), primary_key=True),
    sa.Column("labeler_id", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("assigned_at_us", sa.BigInteger(), nullable=False),
    sa.Column("lease_expires_us", sa.BigInteger(), nullable=False),
    sa.Column("completed_at_us", sa.BigInteger(), nullable=True),
    sa.Column("record_id", sa.String(64), nullable=True),
    sa.Column("choice", sa.Integer(), nullable=True),
    sa.Column("score", sa.Integer(), nullable=True),
    sa.Index(None, "labeler_id", "status"),
)
