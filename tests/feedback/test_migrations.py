"""Alembic migrations: the migrated database matches the table definitions, and migrations can be undone."""

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from rlhf.feedback.schema import metadata
from rlhf.feedback.store import MIGRATIONS_DIR, FeedbackStore


def test_migrated_schema_matches_the_table_definitions(store):
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_downgrade_to_base_and_upgrade_again(database_url):
    with FeedbackStore(database_url) as store:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with store._write_engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(sa.inspect(store.engine).get_table_names()) == {"alembic_version"}
        store.migrate()
        assert {"records", "labelers", "snapshots", "snapshot_records", "labeling_tasks"} <= set(
            sa.inspect(store.engine).get_table_names()
        )
        assert store.schema_revision() == "0002"  # the newest revision (0002: labeling queue)


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path):
    with FeedbackStore(f"sqlite:///{tmp_path}/f.db") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
