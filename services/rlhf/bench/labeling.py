"""`python -m rlhf.bench labeling`: the labeling queue under concurrent labelers, SQLite and PostgreSQL.

``TASKS`` two-response tasks with redundancy 2 are worked off by ``LABELERS`` threads sharing one store, as
the request threads of the labeling page do, each looping "next task, submit a judgment" until nothing is
left (tests/labeling covers separate processes' worth of stores for correctness). Reported per backend: judgments per second, p50/p99 latency of a claim
(``next_task``) and of a submit (validated, idempotent record write + assignment update in one durable
transaction), and a check that every task got exactly 2 judgments from 2 different labelers.
PostgreSQL runs on a throwaway local server (Debian binaries) and is skipped when they are missing.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from rlhf.bench.results import write_result
from rlhf.feedback.pg_local import LocalPostgres, find_pg_bin
from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.queue import LabelingQueue
from rlhf.labeling.tasks import Judgment, TaskSpec

TASKS = 300
LABELERS = 6
REDUNDANCY = 2


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _work(queue, labeler: str, barrier, claims: list, submits: list, seen: dict, errors: list) -> None:
    try:
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            task = queue.next_task(labeler)
            t1 = time.perf_counter()
            claims.append(t1 - t0)
            if task is None:
                return
            seen[labeler].append(task.id)
            queue.submit(Judgment(task.id, labeler, chosen_index=len(task.id) % 2, score=5))
            submits.append(time.perf_counter() - t1)
    except Exception as exc:
        errors.append(repr(exc))


def _run_backend(url: str) -> dict:
    with FeedbackStore(url, pool_size=LABELERS, pool_max_overflow=2) as store:
        queue = LabelingQueue(store, redundancy=REDUNDANCY)
        specs = [
            TaskSpec(f"Prompt {i}: say something kind.", [f"Kind words {i}.", f"Other words {i}."])
            for i in range(TASKS)
        ]
        ids = queue.enqueue(specs).ids
        labelers = [f"labeler-{i}" for i in range(LABELERS)]
        claims: list[float] = []
        submits: list[float] = []
        seen: dict[str, list[str]] = {name: [] for name in labelers}
        errors: list[str] = []
        barrier = threading.Barrier(LABELERS + 1)
        threads = [
            threading.Thread(target=_work, args=(queue, name, barrier, claims, submits, seen, errors))
            for name in labelers
        ]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    per_task = Counter(task_id for got in seen.values() for task_id in got)
    correct = (
        not errors
        and all(len(got) == len(set(got)) for got in seen.values())
        and per_task == {task_id: REDUNDANCY for task_id in ids}
    )
    return {
        "judgments": len(submits),
        "seconds": round(elapsed, 2),
        "judgments_per_second": round(len(submits) / elapsed, 1),
        "claim_p50_ms": round(1000 * statistics.median(claims), 2),
        "claim_p99_ms": round(1000 * _percentile(claims, 0.99), 2),
        "submit_p50_ms": round(1000 * statistics.median(submits), 2),
        "submit_p99_ms": round(1000 * _percentile(submits, 0.99), 2),
        "every_task_judged_exactly_twice_by_different_labelers": correct,
        "errors": errors[:5],
    }


def run(out_dir: Path) -> dict:
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-labeling-") as tmp:
        results["sqlite"] = _run_backend(f"sqlite:///{tmp}/feedback.db")
        if find_pg_bin() is not None:
            pg = LocalPostgres().start()
            try:
                results["postgresql"] = _run_backend(pg.create_database("labeling_bench"))
            finally:
                pg.stop()
    rows = [
        f"| {name} | {r['judgments']} | {r['judgments_per_second']} | {r['claim_p50_ms']} / {r['claim_p99_ms']} | "
        f"{r['submit_p50_ms']} / {r['submit_p99_ms']} | {r['every_task_judged_exactly_twice_by_different_labelers']} |"
        for name, r in results.items()
    ]
    markdown = (
        f"# Labeling queue: {LABELERS} concurrent labelers, {TASKS} tasks x redundancy {REDUNDANCY}\n\n"
        "| backend | judgments | judgments/s | claim p50 / p99 ms | submit p50 / p99 ms | exact redundancy |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    result = {"tasks": TASKS, "labelers": LABELERS, "redundancy": REDUNDANCY, "backends": results}
    write_result(out_dir, "labeling", result, markdown)
    return result
