"""Alembic environment: run with the connection the store passes in (``config.attributes["connection"]``),
or, from the ``alembic`` command line, with ``sqlalchemy.url`` / ``RLHF_FEEDBACK_DATABASE_URL``."""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from rlhf.feedback.schema import metadata

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("RLHF_FEEDBACK_DATABASE_URL")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
