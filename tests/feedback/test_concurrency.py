"""Concurrency: 8 writers with overlapping idempotency keys leave no duplicates and lose no writes.

Twice per backend: 8 threads through one gRPC server (the production shape), and 8 separate processes writing
straight into one new database (e.g. imports next to a server, or several server replicas), which also run
the schema migrations at the same moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf.feedback import records as rec
from rlhf.feedback.store import FeedbackStore

from .concurrent_writer import WRITERS, all_keys, comparison, run

WRITER_SCRIPT = Path(__file__).with_name("concurrent_writer.py")


def check_outcome(results: list[dict], store: FeedbackStore) -> None:
    keys = {f"cc-{k}" for k in all_keys()}
    # Every writer got the same id for a key, and that is the id derived from the key.
    for result in results:
        for key, record_id in result["ids"].items():
            assert record_id == rec.record_id("comparison", key)
    assert set().union(*(r["ids"] for r in results)) == keys
    # Each key was created by exactly one call (no lost or doubled creations) ...
    assert sum(r["created"] for r in results) == len(keys)
    # ... and is stored exactly once, with its content.
    stored = [rec.exported_record(m) for m in store.export(kinds=["comparison"])]
    assert sorted(m.idempotency_key for m in stored) == sorted(keys)
    for message in stored:
        sent = comparison(int(message.idempotency_key[3:]))
        assert message.id == rec.record_id("comparison", sent.idempotency_key)
        assert [r.text for r in message.responses] == [r.text for r in sent.responses]
        assert (message.chosen_index, message.prompt.text) == (sent.chosen_index, sent.prompt.text)
    assert store.stats().records_by_kind["comparison"] == len(keys)
    assert store.stats().num_labelers == 3


def test_eight_grpc_writers_with_overlapping_keys(server, database_url):
    seed = int.from_bytes(os.urandom(2), "big")
    clients = [server.client() for _ in range(WRITERS)]
    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            results = list(pool.map(lambda w: run(clients[w], w, seed), range(WRITERS)))
    finally:
        for client in clients:
            client.close()
    with FeedbackStore(database_url) as store:
        check_outcome(results, store)


def test_eight_writer_processes_on_one_new_database(database_url):
    seed = int.from_bytes(os.urandom(2), "big")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER_SCRIPT), database_url, str(w), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in range(WRITERS)
    ]
    results = []
    for w, proc in enumerate(procs):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"writer {w} (seed {seed}) failed:\n{err[-3000:]}"
        results.append(json.loads(out))
    with FeedbackStore(database_url) as store:
        check_outcome(results, store)
