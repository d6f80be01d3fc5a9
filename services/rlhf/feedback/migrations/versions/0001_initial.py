"""Initial schema: records, labelers, snapshots, snapshot_records.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "records",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(256), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("labeler_id", sa.String(128), nullable=True),
        sa.Column("prompt_id", sa.String(64), nullable=True),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("payload", Json, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_records"),
        sa.UniqueConstraint("kind", "idempotency_key", name="uq_records_kind_idempotency_key"),
        sa.UniqueConstraint("id", name="uq_records_id"),
    )
    op.create_index("ix_records_labeler_id", "records", ["labeler_id"])
    op.create_index("ix_records_created_at_us", "records", ["created_at_us"])
    op.create_table(
        "labelers",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("display_name", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("metadata", Json, nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_labelers"),
    )
    op.create_table(
        "snapshots",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("params", Json, nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("records_by_kind", Json, nullable=False),
        sa.Column("num_train", sa.BigInteger(), nullable=False),
        sa.Column("num_eval", sa.BigInteger(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_snapshots"),
    )
    op.create_table(
        "snapshot_records",
        sa.Column("snapshot_name", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("split", sa.SmallInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_name"], ["snapshots.name"], name="fk_snapshot_records_snapshot_name_snapshots"
        ),
        sa.ForeignKeyConstraint(["seq"], ["records.seq"], name="fk_snapshot_records_seq_records"),
        sa.PrimaryKeyConstraint("snapshot_name", "seq", name="pk_snapshot_records"),
    )


def downgrade() -> None:
    op.drop_table("snapshot_records")
    op.drop_table("snapshots")
    op.drop_table("labelers")
    op.drop_index("ix_records_created_at_us", table_name="records")
    op.drop_index("ix_records_labeler_id", table_name="records")
    op.drop_table("records")
