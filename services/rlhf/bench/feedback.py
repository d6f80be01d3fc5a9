"""`python -m rlhf.bench feedback`: ingest and export rates of the feedback store through its gRPC service.

For SQLite and PostgreSQL (a throwaway local server when the Debian binaries are installed, or
``RLHF_BENCH_POSTGRES_URL``), with durability on (SQLite: WAL, synchronous=FULL; PostgreSQL: fsync and
synchronous_commit on, its defaults), the server runs as its own process (``rlhf serve feedback`` under the
Launcher) and this process is the client:

- ingest: AddComparisons with batches of 1000 and 100 comparisons (requests built before the clock starts),
  one client sending batch after batch, and 4 client threads at once; unbatched (1 per call) for contrast;
- export: the streaming Export of everything stored, as messages and as JSONL lines;
- the store alone (no gRPC, in this process) for the same batches, to separate transport from storage;
- server CPU time per record (from /proc), which is steadier than wall time on a shared machine, and the load
  average during the run;
- where the server's time goes: py-spy samples of the server process during one ingest run, when py-spy is
  installed (``pip install py-spy``), summarised by function.

Target (issue 4): >= 10,000 comparisons/s batched ingest on SQLite on a 2-core machine.
"""

from __future__ import annotations

import collections
import io
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from rlhf.bench.results import write_result
from rlhf.core.client import RetryPolicy
from rlhf.core.launcher import Launcher
from rlhf.feedback import jsonl
from rlhf.feedback import records as rec
from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.engine import normalize_url
from rlhf.feedback.pg_local import LocalPostgres, find_pg_bin
from rlhf.feedback.store import FeedbackStore
from rlhf.v1 import feedback_pb2

TARGET_PER_SECOND = 10_000
BATCHED = [(1000, 40), (100, 100)]  # (comparisons per request, requests)
CONCURRENT = (4, 10, 1000)  # client threads, requests each, comparisons per request
UNBATCHED = 300  # single-comparison requests
PROFILE_REQUESTS = 40


class _Skip(Exception):
    pass


def comparison_requests(prefix: str, requests: int, size: int):
    """AddComparisons requests with realistic sizes (a ~70-char prompt, two ~170-char responses)."""
    out = []
    for b in range(requests):
        items = []
        for i in range(size):
            n = b * size + i
            items.append(
                rec.make_comparison(
                    f"Prompt {prefix}-{n}: explain how tides work to a ten-year-old, briefly.",
                    [
                        f"Response A to {n}. The moon pulls on the oceans, so the water bulges toward it "
                        "and on the far side too; as the earth turns, coasts pass through the bulges.",
                        f"Response B to {n}. Tides happen because the wind pushes water to the shore every "
                        "morning and the sun warms it back out to sea in the evening, twice a day.",
                    ],
                    idempotency_key=f"{prefix}-{n}",
                    chosen_index=n % 2,
                    labeler_id=f"labeler-{n % 17}",
                    model_versions=["policy:3", "policy:4"],
                )
            )
        out.append(feedback_pb2.AddComparisonsRequest(comparisons=items))
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _timed_ingest(send, requests, server_pid: int | None, threads: int = 1) -> dict:
    n = sum(len(r.comparisons) for r in requests)
    cpu0 = _cpu_seconds(server_pid) if server_pid else None
    start = time.perf_counter()
    if threads == 1:
        for request in requests:
            send(request)
    else:
        errors = []

        def worker(part):
            try:
                for request in part:
                    send(request)
            except Exception as exc:  # reported below
                errors.append(exc)

        workers = [threading.Thread(target=worker, args=(requests[t::threads],)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
    seconds = time.perf_counter() - start
    out = {"records": n, "seconds": round(seconds, 3), "per_second": round(n / seconds)}
    if server_pid:
        out["server_cpu_us_per_record"] = round((_cpu_seconds(server_pid) - cpu0) / n * 1e6, 1)
    return out


def _durability(url: str, backend: str) -> dict:
    if backend == "sqlite":
        return {"journal_mode": "wal", "synchronous": "FULL (set on every connection by the store)"}
    import psycopg

    dsn = normalize_url(url).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        return {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes")
        }


# Where a sample of the server goes: the first of these found walking from the innermost frame outwards.
PROFILE_CATEGORIES = [
    ("store-size and record-count gauges (GetStats every stats_refresh_seconds)", ("FeedbackStore.stats",)),
    ("durable commit (fsync)", ("do_commit",)),
    ("insert (executemany)", ("_insert_records",)),
    ("idempotency key lookup", ("_stored_hashes",)),
    ("labelers and prompt references", ("_ensure_labelers", "_resolve_prompts")),
    ("validation", ("validation.py",)),
    ("payloads and hashes", ("records.py", "make_row", "RecordWriter.prepare", "FeedbackStore.prepare")),
    ("begin transaction, lock", ("Database.write_tx", "_on_begin", "Engine.begin")),
    # the store's modules (rlhf/feedback: store.py the facade, engine.py, writes.py, snapshots.py); reads.py
    # runs in ingest only under FeedbackStore.stats, counted above
    ("other store code", ("store.py", "engine.py", "writes.py", "snapshots.py")),
]
OTHER = "gRPC, protobuf, event loop, threads"


def _profile_summary(raw: Path, top: int = 15) -> dict:
    """Shares of py-spy's raw (collapsed) stacks by category, and the functions with the most own samples."""
    by_category: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        own[frames[-1].rsplit(":", 1)[0] + ")"] += n
        category = None
        for frame in reversed(frames):
            category = next((c for c, marks in PROFILE_CATEGORIES if any(m in frame for m in marks)), None)
            if category:
                break
        by_category[category or OTHER] += n
    return {
        "samples": total,
        "breakdown": {c: round(k / total, 3) for c, k in by_category.most_common()},
        "top_self": [{"function": f, "share": round(k / total, 3)} for f, k in own.most_common(top)],
    }


def _profile_ingest(service, client, out_dir: Path, name: str) -> dict | None:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    raw = out_dir / f"feedback-{name}-profile.txt"
    proc = subprocess.Popen(
        [
            py_spy,
            "record",
            "-p",
            str(service.proc.pid),
            "-o",
            str(raw),
            "-f",
            "raw",
            "-r",
            "250",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)  # py-spy attaches
    requests = comparison_requests(f"{name}-profile", PROFILE_REQUESTS, 1000)
    for request in requests:
        client.stub.AddComparisons(request, timeout=300)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"skipped": "py-spy did not finish"}
    if not raw.exists():
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
    return {"raw": raw.name, **_profile_summary(raw)}


def bench_backend(name: str, url: str, direct_url: str, out_dir: Path, workdir: Path, profile: bool) -> dict:
    result: dict = {"durability": _durability(url, name)}
    with Launcher(workdir / name, env={"RLHF_LOG_LEVEL": "WARNING"}) as launcher:
        service = launcher.start(
            "feedback",
            ["serve", "feedback"],
            args=["--database-url", url, "--max-batch-size", "4096", "--metrics-port", "-1"],
            timeout=180,
        )
        pid = service.proc.pid
        with FeedbackClient(service.target, retry=RetryPolicy(retry_timeout=0), timeout=300) as client:

            def send(request):
                client.stub.AddComparisons(request, timeout=300)

            send(comparison_requests(f"{name}-warm", 1, 100)[0])  # connections, caches, labelers
            ingest = {}
            for size, count in BATCHED:
                requests = comparison_requests(f"{name}-b{size}", count, size)
                ingest[f"batch_{size}"] = _timed_ingest(send, requests, pid)
            threads, count, size = CONCURRENT
            requests = comparison_requests(f"{name}-concurrent", threads * count, size)
            ingest[f"batch_{size}_{threads}_clients"] = _timed_ingest(send, requests, pid, threads=threads)
            requests = comparison_requests(f"{name}-single", UNBATCHED, 1)
            ingest["unbatched"] = _timed_ingest(send, requests, pid)
            result["ingest_via_grpc"] = ingest

            cpu0, start = _cpu_seconds(pid), time.perf_counter()
            exported = sum(1 for _ in client.export())
            seconds = time.perf_counter() - start
            export = {
                "messages": {
                    "records": exported,
                    "seconds": round(seconds, 3),
                    "per_second": round(exported / seconds),
                    "server_cpu_us_per_record": round((_cpu_seconds(pid) - cpu0) / exported * 1e6, 1),
                }
            }
            start = time.perf_counter()
            lines = jsonl.write_jsonl(client.export(), io.StringIO())
            seconds = time.perf_counter() - start
            export["jsonl"] = {
                "records": lines,
                "seconds": round(seconds, 3),
                "per_second": round(lines / seconds),
            }
            result["export_via_grpc"] = export
            if profile:
                result["server_profile_batch_1000"] = _profile_ingest(service, client, out_dir, name)

    with FeedbackStore(
        direct_url
    ) as store:  # the store alone, in this process: no gRPC, no protobuf transport
        store.add_comparisons(list(comparison_requests(f"{name}-dwarm", 1, 100)[0].comparisons))
        direct = {}
        for size, count in BATCHED:
            batches = [list(r.comparisons) for r in comparison_requests(f"{name}-d{size}", count, size)]
            n = sum(len(b) for b in batches)
            cpu0, start = time.process_time(), time.perf_counter()
            for batch in batches:
                store.add_comparisons(batch)
            seconds = time.perf_counter() - start
            direct[f"batch_{size}"] = {
                "records": n,
                "seconds": round(seconds, 3),
                "per_second": round(n / seconds),
                "cpu_us_per_record": round((time.process_time() - cpu0) / n * 1e6, 1),
            }
        result["ingest_store_only"] = direct
    return result


def _markdown(result: dict) -> str:
    lines = [
        "# Feedback store: ingest and export through gRPC (durability on)",
        "",
        f"Load average during the run: {result['load_average']} on {os.cpu_count()} cores (a shared machine).",
        "",
        "| backend | scenario | records | per second | server CPU µs/record |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for backend, r in result["backends"].items():
        if "skipped" in r:
            lines.append(f"| {backend} | skipped: {r['skipped']} | | | |")
            continue
        for group in ("ingest_via_grpc", "export_via_grpc", "ingest_store_only"):
            for scenario, m in r[group].items():
                cpu = m.get("server_cpu_us_per_record", m.get("cpu_us_per_record", ""))
                lines.append(
                    f"| {backend} | {group.replace('_', ' ')}: {scenario} | {m['records']} | {m['per_second']} | {cpu} |"
                )
    lines += [
        "",
        f"Target: >= {TARGET_PER_SECOND} comparisons/s batched ingest on SQLite: {result['verdict']}.",
    ]
    for backend, r in result["backends"].items():
        prof = r.get("server_profile_batch_1000") if isinstance(r, dict) else None
        if prof and "breakdown" in prof:
            lines += ["", f"## Where the {backend} server's time goes (py-spy, batches of 1000)", ""]
            lines += [f"- {share:.0%} {category}" for category, share in prof["breakdown"].items()]
    return "\n".join(lines) + "\n"


def run(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-bench-feedback-"))
    load_before = os.getloadavg()
    wanted = os.environ.get("RLHF_BENCH_FEEDBACK_BACKENDS", "sqlite,postgresql").split(",")
    backends: dict = {}
    try:
        backends["sqlite"] = bench_backend(
            "sqlite",
            f"sqlite:///{workdir}/feedback.db",
            f"sqlite:///{workdir}/direct.db",
            out_dir,
            workdir,
            profile=True,
        )
        pg = None
        try:
            if "postgresql" not in wanted:
                raise _Skip("not in RLHF_BENCH_FEEDBACK_BACKENDS")
            if os.environ.get("RLHF_BENCH_POSTGRES_URL"):
                url = direct = os.environ["RLHF_BENCH_POSTGRES_URL"]  # (the two runs use other keys)
            elif find_pg_bin() is not None:
                pg = LocalPostgres().start()
                url, direct = pg.create_database("bench_grpc"), pg.create_database("bench_direct")
            else:
                url = None
            if url:
                backends["postgresql"] = bench_backend(
                    "postgresql", url, direct, out_dir, workdir, profile=True
                )
            else:
                backends["postgresql"] = {"skipped": "no PostgreSQL (apt-get install postgresql)"}
        except _Skip as skip:
            backends["postgresql"] = {"skipped": str(skip)}
        finally:
            if pg is not None:
                pg.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    best = backends["sqlite"]["ingest_via_grpc"]["batch_1000"]["per_second"]
    result = {
        "target_comparisons_per_second": TARGET_PER_SECOND,
        "sqlite_batched_ingest_per_second": best,
        "verdict": f"{'met' if best >= TARGET_PER_SECOND else 'NOT met'} ({best}/s, one client, batches of 1000)",
        "load_average": [round(x, 1) for x in (*load_before[:1], *load_after[:1])],
        "backends": backends,
    }
    write_result(out_dir, "feedback", result, _markdown(result))
    return result
