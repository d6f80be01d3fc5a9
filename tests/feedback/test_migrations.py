"""Alembic migrations: the migrated database matches the table definitions, and migrations can be undone."""

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from rlhf.feedback.engine import MIGRATIONS_DIR
from rlhf.feedback.schema import metadata
from rlhf.feedback.store import FeedbackStore


def test_migrated_schema_matches_the_table_definitions(store):
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_downgrade_to_base_and_upgrade_again(database_url):
    with FeedbackStore(database_url) as store:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with store.write_transaction() as tx:
            cfg.attributes["connection"] = tx.connection
            command.downgrade(cfg, "base")
        assert set(sa.inspect(store.engine).get_table_names()) == {"alembic_version"}
        store.migrate()
        assert {"records", "labelers", "snapshots", "snapshot_records", "labeling_tasks"} <= set(
            sa.inspect(store.engine).get_table_names()
        )
        assert store.schema_revision() == "0003"  # the newest revision (0003: open-task index)


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path):
    with FeedbackStore(f"sqlite:///{tmp_path}/f.db") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def _claim_plan(store: FeedbackStore) -> str:
    """The database's plan for the next-task query (candidate_query, as LabelingQueue.next_task runs it)."""
    from rlhf.labeling.queue import candidate_query

    sql = str(candidate_query("ann", 0).compile(store.engine, compile_kwargs={"literal_binds": True}))
    # New connections: sqlite3's statement cache would replay an EXPLAIN prepared before a schema change
    # (EXPLAIN never runs the statement, so SQLite does not notice the change and re-prepare it).
    store.engine.dispose()
    with store.engine.connect() as conn:
        if store.backend == "postgresql":
            conn.exec_driver_sql("ANALYZE labeling_tasks")
            return "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql))
        return "\n".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))


def test_0003_open_task_index_serves_the_next_task_query_and_downgrades(database_url):
    from rlhf.feedback.schema import labeling_tasks as tasks
    from rlhf.labeling.queue import LabelingQueue
    from rlhf.labeling.tasks import TaskSpec

    with FeedbackStore(database_url) as store:
        # a queue whose front is finished: 3000 judged tasks, then 5 open ones
        queue = LabelingQueue(store, redundancy=1)
        queue.enqueue([TaskSpec(f"Rate answer {i}.", ["Fine."]) for i in range(3005)])
        with store.write_transaction() as tx:
            tx.execute(tasks.update().where(tasks.c.seq <= 3000).values(judgments=1))
            seq_of = dict(tx.execute(sa.select(tasks.c.id, tasks.c.seq)).all())
        assert "ix_labeling_tasks_open_seq" in _claim_plan(store)
        assert seq_of[queue.next_task("ann").id] == 3001

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with store.write_transaction() as tx:
            cfg.attributes["connection"] = tx.connection
            command.downgrade(cfg, "0002")
        assert store.schema_revision() == "0002"
        indexes = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("labeling_tasks")}
        assert "ix_labeling_tasks_open_seq" not in indexes
        assert "ix_labeling_tasks_open_seq" not in _claim_plan(store)
        assert (
            seq_of[queue.next_task("bob").id] == 3002
        )  # the queue works without it, scanning from the front

        store.migrate()
        assert store.schema_revision() == "0003"
        assert "ix_labeling_tasks_open_seq" in _claim_plan(store)
        assert seq_of[queue.next_task("cid").id] == 3003
