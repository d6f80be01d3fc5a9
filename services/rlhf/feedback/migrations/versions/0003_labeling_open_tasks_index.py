"""Labeling queue: a partial index on the open tasks in queue order, for the next-task query.

The next-task query takes the first task in ``seq`` order that still wants judgments
(``judgments < redundancy``). Finished tasks pile up at the front of the queue; without this index the query
walks past all of them on every claim. The index holds only the open tasks, so the walk starts at the first
one. SQLite and PostgreSQL both use it (the query repeats the index's predicate word for word).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OPEN = sa.text("judgments < redundancy")


def upgrade() -> None:
    op.create_index(
        "ix_labeling_tasks_open_seq",
        "labeling_tasks",
        ["seq"],
        sqlite_where=OPEN,
        postgresql_where=OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_labeling_tasks_open_seq", table_name="labeling_tasks")
