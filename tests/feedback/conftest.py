"""Fixtures of the feedback store tests: both backends (SQLite file, a throwaway PostgreSQL server the fixture
starts itself), stores, and an in-process gRPC server."""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass

import pytest

from rlhf.core.server import ServerHandle, ServerThread
from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.pg_local import LocalPostgres, find_pg_bin
from rlhf.feedback.server import FeedbackServicer, service_def
from rlhf.feedback.store import FeedbackStore

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
_db_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL 15 cluster for the session: initdb as user postgres in a temp dir, a free port."""
    if find_pg_bin() is None:
        pytest.skip(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
    pg = LocalPostgres().start()
    yield pg
    pg.stop()


def new_database_url(request, backend: str, tmp_path) -> str:
    """A new, empty SQLite file, or a new schema in the session's PostgreSQL server (it behaves as a database)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/feedback-{next(_db_numbers)}.db"
    pg = request.getfixturevalue("postgres")
    return pg.create_schema(f"feedback_{os.getpid()}_{next(_db_numbers)}")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def database_url(request, backend, tmp_path) -> str:
    """A fresh, empty database of each backend."""
    return new_database_url(request, backend, tmp_path)


@pytest.fixture
def store(database_url):
    with FeedbackStore(database_url) as s:
        yield s


@dataclass
class RunningServer:
    target: str
    servicer: FeedbackServicer
    handle: ServerHandle
    config: FeedbackConfig

    def client(self, **kw) -> FeedbackClient:
        return FeedbackClient(self.target, **kw)


@contextlib.contextmanager
def running_server(**config_kw):
    """A feedback server in a background thread of this process (port 0), stopped on exit."""
    config = FeedbackConfig(
        **{
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": -1,
            "metrics_host": "127.0.0.1",
            "grace_seconds": 2,
            **config_kw,
        }
    )
    servicer = FeedbackServicer(config)
    with ServerThread(
        config,
        [service_def(servicer)],
        load=servicer.load,
        on_shutdown=servicer.shutdown,
        name="feedback-server",
    ) as running:
        yield RunningServer(running.target, servicer, running.handle, config)


@pytest.fixture
def server(database_url):
    with running_server(database_url=database_url, export_page_size=7) as running:
        yield running


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
