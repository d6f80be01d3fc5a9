"""Labeling queue: labeling_tasks and labeling_assignments.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "labeling_tasks",
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
        sa.PrimaryKeyConstraint("seq", name="pk_labeling_tasks"),
        sa.UniqueConstraint("id", name="uq_labeling_tasks_id"),
        sa.UniqueConstraint("idempotency_key", name="uq_labeling_tasks_idempotency_key"),
    )
    op.create_table(
        "labeling_assignments",
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("labeler_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("assigned_at_us", sa.BigInteger(), nullable=False),
        sa.Column("lease_expires_us", sa.BigInteger(), nullable=False),
        sa.Column("completed_at_us", sa.BigInteger(), nullable=True),
        sa.Column("record_id", sa.String(64), nullable=True),
        sa.Column("choice", sa.Integer(), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["task_id"], ["labeling_tasks.id"], name="fk_labeling_assignments_task_id_labeling_tasks"
        ),
        sa.PrimaryKeyConstraint("task_id", "labeler_id", name="pk_labeling_assignments"),
    )
    op.create_index(
        "ix_labeling_assignments_labeler_id_status", "labeling_assignments", ["labeler_id", "status"]
    )


def downgrade() -> None:
    op.drop_index("ix_labeling_assignments_labeler_id_status", table_name="labeling_assignments")
    op.drop_table("labeling_assignments")
    op.drop_table("labeling_tasks")
