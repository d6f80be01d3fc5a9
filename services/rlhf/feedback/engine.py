"""The store's database connection: URLs, the SQLAlchemy engine (SQLite pragmas, PostgreSQL pool), migrations,
and the serialized write transaction every write of the store runs in."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
WRITE_LOCK_KEY = 0x524C4846  # "RLHF": PostgreSQL advisory lock serializing record writes
MIGRATION_LOCK_KEY = 0x524C4847


def normalize_url(url: str) -> str:
    """Accept libpq-style URLs (postgresql://, postgres://) and use the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def redact_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


class Database:
    """One engine over SQLite (a file, WAL, synchronous=FULL) or PostgreSQL, with serialized write transactions.

    ``backend`` is ``"sqlite"`` or ``"postgresql"``; ``sqlite_path`` the SQLite file (None on PostgreSQL).
    """

    def __init__(self, url: str, *, pool_size: int, pool_max_overflow: int, busy_timeout_seconds: float):
        self.url = normalize_url(url)
        url_obj = sa.engine.make_url(self.url)
        self.backend = url_obj.get_backend_name()
        if self.backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.backend!r}: use sqlite:///FILE or postgresql://...")
        self._lock = threading.Lock() if self.backend == "sqlite" else None
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
                self.url, pool_size=pool_size, max_overflow=pool_max_overflow, pool_pre_ping=True
            )
        self._write_engine = self.engine.execution_options(rlhf_write=True)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to run from several replicas at once)."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._write_engine.begin() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def write_tx(self, *, serialize: bool = True) -> Iterator[sa.Connection]:
        """A write transaction; commits (durably) on success, rolls back on any error.

        SQLite: always serialized (an in-process lock and BEGIN IMMEDIATE). PostgreSQL: serialized by a
        transaction-scoped advisory lock, unless ``serialize=False`` (the caller locks rows itself).
        """
        if self._lock is not None:
            with self._lock, self._write_engine.begin() as conn:
                yield conn
        elif not serialize:
            with self.engine.begin() as conn:
                yield conn
        else:
            with self._write_engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITE_LOCK_KEY})
                yield conn


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
