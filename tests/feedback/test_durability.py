"""Durability: acknowledged comparisons survive SIGKILL of the server process, on both backends.

The server runs as its own process (``rlhf serve feedback`` under :class:`rlhf.core.launcher.Launcher`). A
writer thread sends >= 10,000 comparisons in batches, retrying every batch that was not acknowledged, while
the test SIGKILLs the server at random moments and starts it again. Afterwards (and after one more SIGKILL),
every acknowledged record is stored exactly once, with the id and content it was acknowledged with; batches
that were committed but whose acknowledgement was lost come back on their retry with the same ids.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import grpc
import pytest
import sqlalchemy as sa

from rlhf.core.client import RetryPolicy
from rlhf.core.launcher import Launcher
from rlhf.feedback import records as rec
from rlhf.feedback.client import FeedbackClient

BATCHES = 42
BATCH_SIZE = 250  # 10,500 comparisons
KILLS = 3
NO_RETRY = RetryPolicy(retry_timeout=0)  # the test retries by hand, so it sees every unacknowledged batch


def comparison(b: int, i: int):
    n = b * BATCH_SIZE + i
    return rec.make_comparison(
        f"durable prompt {n}: " + "p" * (n % 50),
        [f"answer A to {n}", f"answer B to {n}", f"answer C to {n}"][: 2 + n % 2],
        idempotency_key=f"dur-{b}-{i}",
        chosen_index=n % 2,
        labeler_id=f"labeler-{n % 5}",
        reason="kept" if n % 3 == 0 else "",
    )


def batch(b: int):
    return [comparison(b, i) for i in range(BATCH_SIZE)]


class Writer(threading.Thread):
    """Sends the batches in order; a batch without a response is retried (against the current server)."""

    def __init__(self, target: str):
        super().__init__(name="durability-writer", daemon=True)
        self.target = target  # replaced by the test after every restart
        self.acked: dict[int, list[str]] = {}  # batch number -> ids in the acknowledgement
        self.created = 0
        self.existing = 0
        self.failed_attempts = 0
        self.error: BaseException | None = None
        self.progress = threading.Condition()

    def run(self):
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc
        with self.progress:
            self.progress.notify_all()

    def _run(self):
        client, client_target = None, None
        deadline = time.monotonic() + 300
        for b in range(BATCHES):
            items = batch(b)
            while True:
                assert time.monotonic() < deadline, "writer made no progress for 5 minutes"
                if client_target != self.target:
                    if client is not None:
                        client.close()
                    client_target = self.target
                    client = FeedbackClient(client_target, retry=NO_RETRY, timeout=30, batch_size=BATCH_SIZE)
                try:
                    result = client.add_comparisons(items)
                except grpc.RpcError as exc:
                    # Only transport failures are expected; a refused batch is a bug.
                    assert exc.code() not in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.ALREADY_EXISTS,
                    ), exc.details()
                    self.failed_attempts += 1
                    time.sleep(0.05)
                    continue
                break
            with self.progress:
                self.acked[b] = list(result.ids)
                self.created += result.created
                self.existing += result.existing
                self.progress.notify_all()
        client.close()


def _wait_for_unacknowledged_commit(engine: sa.Engine, writer: Writer, timeout: float = 30) -> None:
    """Poll the database until it holds a batch the writer has not seen acknowledged yet (or time out)."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline and writer.is_alive():
            committed = conn.execute(sa.text("SELECT count(*) FROM records")).scalar_one()
            conn.rollback()  # a fresh snapshot for the next poll
            if committed > len(writer.acked) * BATCH_SIZE:
                return


def _kill(service) -> None:
    os.killpg(service.proc.pid, signal.SIGKILL)
    service.proc.wait(30)


@pytest.mark.slow
def test_acknowledged_comparisons_survive_sigkill(database_url, tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"durability seed {seed}")
    # Kill after a random number of acknowledged batches, then either after a random delay (mid-request,
    # mid-commit or idle) or as soon as a batch is committed but, most likely, not yet acknowledged.
    kill_after = sorted(rng.sample(range(2, BATCHES - 2), KILLS))
    modes = ["after_commit", "random", "after_commit"]
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    args = ["--database-url", database_url, "--grace-seconds", "1"]
    with Launcher(tmp_path / "services") as launcher:
        service = launcher.start("feedback", ["serve", "feedback"], args=args, timeout=120)
        writer = Writer(service.target)
        writer.start()
        kills = 0
        for threshold, mode in zip(kill_after, modes, strict=True):
            with writer.progress:
                writer.progress.wait_for(lambda t=threshold: len(writer.acked) >= t or not writer.is_alive())
            if writer.error is not None or not writer.is_alive():
                break
            if mode == "random":
                time.sleep(rng.uniform(0, 0.08))
            else:
                _wait_for_unacknowledged_commit(engine, writer)
            _kill(service)
            kills += 1
            service = launcher.start("feedback", ["serve", "feedback"], args=args, timeout=120)
            writer.target = service.target
        writer.join(300)
        assert not writer.is_alive(), "writer did not finish"
        if writer.error is not None:
            raise writer.error
        assert kills == KILLS and writer.failed_attempts >= 1, "the kills did not interrupt the writer"

        # Every batch is acknowledged by now. Kill once more (nothing in flight) and restart: all of it is there.
        _kill(service)
        service = launcher.start("feedback", ["serve", "feedback"], args=args, timeout=120)
        total = BATCHES * BATCH_SIZE
        with FeedbackClient(service.target, batch_size=BATCH_SIZE) as client:
            stored = [rec.exported_record(m) for m in client.export(kinds=["comparison"])]
            keys = [m.idempotency_key for m in stored]
            assert len(keys) == len(set(keys)) == total, "a record is missing or stored twice"
            assert client.get_stats().records_by_kind["comparison"] == total
            by_key = {m.idempotency_key: m for m in stored}
            for b, ids in writer.acked.items():
                for i, (sent, record_id) in enumerate(zip(batch(b), ids, strict=True)):
                    got = by_key[f"dur-{b}-{i}"]
                    assert got.id == record_id == rec.record_id("comparison", sent.idempotency_key)
                    assert [r.text for r in got.responses] == [r.text for r in sent.responses]
                    assert (got.chosen_index, got.prompt.text, got.labeler_id, got.reason) == (
                        sent.chosen_index,
                        sent.prompt.text,
                        sent.labeler_id,
                        sent.reason,
                    )
            # A batch committed just before a kill was acknowledged only on its retry, as existing records.
            assert writer.created <= total
            # Retrying acknowledged batches again creates nothing and returns the same ids.
            for b in rng.sample(range(BATCHES), 3):
                again = client.add_comparisons(batch(b))
                assert (again.created, again.existing) == (0, BATCH_SIZE)
                assert list(again.ids) == writer.acked[b]
            assert client.get_stats().records_by_kind["comparison"] == total
        engine.dispose()
        print(
            f"kills={kills} failed_attempts={writer.failed_attempts} created={writer.created} "
            f"existing_on_retry={writer.existing}"
        )
