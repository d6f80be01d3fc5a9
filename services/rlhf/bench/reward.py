"""`python -m rlhf.bench reward`: the reward service under many small concurrent calls.

A 135M reward model (SmolLM2-135M-Instruct with a fresh scalar head, saved once to a temp folder) is served by
two ``rlhf serve reward`` processes side by side: micro-batching across callers (``max_batch_size=32``) and one
forward pass per request (``max_batch_size=1``). ``CALLERS`` concurrent callers each send one pair per request,
back to back, in blocks that alternate between the two servers (so drifting load on a shared machine hits both
alike), after a warm-up request per caller.
Reported: throughput (pairs/s), client-side p50/p99 latency, and the mean forward batch size read from the
server's ``rlhf_reward_batch_size`` histogram.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from rlhf.bench.results import write_result
from rlhf.core.launcher import Launcher
from rlhf.core.models import init_reward_model_from_causal_lm, set_torch_threads
from rlhf.reward.checkpoint import save_reward_checkpoint
from rlhf.reward.client import AsyncRewardClient

CALLERS = 32
BLOCKS = 3  # alternating blocks per configuration
PER_CALLER = 2  # requests per caller in a block
# torch threads of each server: 1, the service's default (RLHF_BENCH_THREADS=2 to compare). On a crowded 2-core
# machine 2 threads stall on OpenMP barriers, and the stalls grow with the size of the batch.
THREADS = int(os.environ.get("RLHF_BENCH_THREADS", "1"))
CONFIGS = {
    "micro_batching": {"max_batch_size": 32, "max_wait_ms": 10},
    "one_forward_per_request": {"max_batch_size": 1, "max_wait_ms": 0},
}

PROMPTS = [
    "Write a short review of a restaurant.",
    "Give me advice about learning to cook.",
    "Tell a story about a cat.",
    "What is the capital of France?",
    "How do I keep my plants alive?",
    "Explain photosynthesis to a child.",
    "Suggest a name for a bakery.",
    "Why is the sky blue?",
]
RESPONSES = [
    "The food was wonderful and the staff were kind; I will come back soon.",
    "Start with simple dishes like eggs and pasta, and cook a little every day.",
    "Once upon a time a curious cat climbed the tallest tree in town.",
    "Paris.",
    "Water them regularly, give them light, and do not let the roots sit in water.",
    "Plants use sunlight to turn water and air into the food they need to grow.",
    "How about 'Rise and Shine Bakery'?",
    "Sunlight scatters off air molecules, and blue light scatters the most.",
]


def pairs_for(caller: int) -> tuple[str, str]:
    return PROMPTS[caller % len(PROMPTS)], RESPONSES[(caller * 3 + 1) % len(RESPONSES)]


def build_checkpoint(folder: Path) -> Path:
    set_torch_threads(THREADS)
    model, tokenizer = init_reward_model_from_causal_lm()
    return save_reward_checkpoint(
        model,
        tokenizer,
        folder / "smollm2-135m-rm",
        reward_mean=0.0,
        reward_std=1.0,
        version="smollm2-135m-rm-init",
        extra={"base_model": "SmolLM2-135M-Instruct", "note": "benchmark: random scalar head"},
    )


async def _block(client, per_caller: int, latencies: list[float]) -> float:
    """All callers at once, each sending ``per_caller`` one-pair requests back to back; the wall time."""

    async def caller(c: int) -> None:
        for _ in range(per_caller):
            start = time.perf_counter()
            await client.score([pairs_for(c)])
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(CALLERS)))
    return time.perf_counter() - start


async def _measure(services: dict, blocks: int, per_caller: int) -> dict:
    """Blocks alternate between the configurations, so a change in the machine's load hits both alike."""
    clients = {name: AsyncRewardClient(s.target, timeout=900) for name, s in services.items()}
    latencies: dict[str, list[float]] = {name: [] for name in services}
    wall = dict.fromkeys(services, 0.0)
    for client in clients.values():  # warm-up: one request per caller
        await asyncio.gather(*(client.score([pairs_for(c)]) for c in range(CALLERS)))
    before = {name: _batch_counts(s.metrics_port) for name, s in services.items()}
    for _ in range(blocks):
        for name, client in clients.items():
            wall[name] += await _block(client, per_caller, latencies[name])
    out = {}
    for name, s in services.items():
        after = _batch_counts(s.metrics_port)
        passes = after[0] - before[name][0]
        lat = sorted(latencies[name])
        out[name] = {
            "forward_passes": int(passes),
            "mean_batch_size": round((after[1] - before[name][1]) / passes, 2) if passes else 0.0,
            "pairs": len(lat),
            "seconds": round(wall[name], 3),
            "pairs_per_second": round(len(lat) / wall[name], 3),
            "p50_latency_s": round(statistics.median(lat), 4),
            "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4),
        }
        await clients[name].close()
    return out


def _batch_counts(metrics_port: int) -> tuple[float, float]:
    """(forward passes, pairs in them) so far, from the server's rlhf_reward_batch_size histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("rlhf_reward_batch_size_count", "rlhf_reward_batch_size_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("rlhf_reward_batch_size_count", 0.0), values.get("rlhf_reward_batch_size_sum", 0.0)


def run(out_dir: Path, blocks: int = BLOCKS, per_caller: int = PER_CALLER) -> dict:
    result: dict = {
        "settings": {
            "callers": CALLERS,
            "requests_per_caller": blocks * per_caller,
            "blocks": blocks,
            "torch_threads": THREADS,
            "model": "SmolLM2-135M-Instruct + scalar head, fp32",
        },
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-reward-") as tmp:
        checkpoint = build_checkpoint(Path(tmp))
        with Launcher(Path(tmp) / "services") as launcher:
            services = {}
            for name, knobs in CONFIGS.items():
                args = ["--model", str(checkpoint), "--torch-threads", str(THREADS)]
                for key, value in knobs.items():
                    args += ["--" + key.replace("_", "-"), str(value)]
                services[name] = launcher.start(f"reward-{name}", ["serve", "reward"], args=args)
            figures = asyncio.run(_measure(services, blocks, per_caller))
    for name, knobs in CONFIGS.items():
        result[name] = {**figures[name], "config": knobs}
        print(f"   {name}: {result[name]}", flush=True)
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)  # the machine is shared
    batched, single = result["micro_batching"], result["one_forward_per_request"]
    result["speedup"] = round(batched["pairs_per_second"] / single["pairs_per_second"], 2)
    write_result(out_dir, "reward", result, markdown=markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    s = result["settings"]
    rows = [
        "| configuration | pairs/s | p50 latency (s) | p99 latency (s) | forward passes | mean batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("micro_batching", "micro-batching (32)"),
        ("one_forward_per_request", "one forward/request"),
    ):
        r = result[key]
        rows.append(
            f"| {label} | {r['pairs_per_second']:.2f} | {r['p50_latency_s']:.3f} | {r['p99_latency_s']:.3f} | "
            f"{r['forward_passes']} | {r['mean_batch_size']:.1f} |"
        )
    return (
        f"{s['callers']} concurrent callers, one pair per request, {s['requests_per_caller']} requests each after a "
        f"warm-up, in {s['blocks']} blocks alternating between the two servers; "
        f"{s['model']}, {s['torch_threads']} torch threads; 1-minute load average before the run "
        f"{result['load_average_1m_before']}, after {result['load_average_1m_after']} "
        "(a shared machine inflates every figure).\n\n"
        + "\n".join(rows)
        + f"\n\nThroughput ratio (micro-batching / one forward per request): {result['speedup']}x\n"
    )
