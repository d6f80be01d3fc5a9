"""Fixtures of the labeling tests: a store on each backend (SQLite file; a throwaway PostgreSQL that the
fixture starts itself, like tests/feedback) and a labeling queue over it."""

from __future__ import annotations

import itertools
import os

import pytest

from rlhf.feedback.pg_local import LocalPostgres, find_pg_bin
from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.queue import LabelingQueue

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
_db_numbers = itertools.count()


@pytest.fixture(scope="session")
def labeling_postgres():
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    pg = LocalPostgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/feedback-{next(_db_numbers)}.db"
    pg = request.getfixturevalue("labeling_postgres")
    return pg.create_database(f"labeling_{os.getpid()}_{next(_db_numbers)}")


@pytest.fixture
def store(database_url):
    with FeedbackStore(database_url) as s:
        yield s


@pytest.fixture
def queue(store):
    return LabelingQueue(store, redundancy=2)
