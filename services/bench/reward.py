"""`python -m rlhf.bench reward`: the reward service under many small concurrent calls.

A 135M reward model (SmolLM2-135M-Instruct with a fresh scalar head, saved once to a temp folder) is served by
``rlhf serve reward`` twice, one configuration after the other in the same run: micro-batching across callers
(``max_batch_size=32``) and one forward pass per request (``max_batch_size=1``). ``CALLERS`` concurrent callers each
send one pair per request, back to back (closed loop), for ``ROUNDS`` requests each after a warm-up round.
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

from rlhf.bench import write_result

CALLERS = 32
ROUNDS = 4
THREADS = 2
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
    from rlhf.core.models import init_reward_model_from_causal_lm, set_torch_threads
    from rlhf.reward.checkpoint import save_reward_checkpoint

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


async def _load(target: str, metrics_port: int, rounds: int) -> dict:
    from rlhf.reward.client import AsyncRewardClient

    async with AsyncRewardClient(target, timeout=600) as client:
        await asyncio.gather(*(client.score([pairs_for(c)]) for c in range(CALLERS)))  # warm-up round
        latencies: list[float] = []
        before = _batch_counts(metrics_port)

        async def caller(c: int) -> None:
            for _ in range(rounds):
                start = time.perf_counter()
                await client.score([pairs_for(c)])
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(CALLERS)))
        wall = time.perf_counter() - start
        after = _batch_counts(metrics_port)
    latencies.sort()
    passes = after[0] - before[0]
    return {
        "forward_passes": int(passes),
        "mean_batch_size": round((after[1] - before[1]) / passes, 2) if passes else 0.0,
        "pairs": len(latencies),
        "seconds": round(wall, 3),
        "pairs_per_second": round(len(latencies) / wall, 3),
        "p50_latency_s": round(statistics.median(latencies), 4),
        "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
    }


def _batch_counts(metrics_port: int) -> tuple[float, float]:
    """(forward passes, pairs in them) so far, from the server's rlhf_reward_batch_size histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("rlhf_reward_batch_size_count", "rlhf_reward_batch_size_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("rlhf_reward_batch_size_count", 0.0), values.get("rlhf_reward_batch_size_sum", 0.0)


def run(out_dir: Path, rounds: int = ROUNDS) -> dict:
    from rlhf.core.launcher import Launcher

    result: dict = {
        "settings": {"callers": CALLERS, "rounds": rounds, "torch_threads": THREADS},
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-reward-") as tmp:
        checkpoint = build_checkpoint(Path(tmp))
        result["settings"]["model"] = "SmolLM2-135M-Instruct + scalar head, fp32"
        with Launcher(Path(tmp) / "services") as launcher:
            for name, knobs in CONFIGS.items():
                args = ["--model", str(checkpoint), "--torch-threads", str(THREADS)]
                for key, value in knobs.items():
                    args += ["--" + key.replace("_", "-"), str(value)]
                service = launcher.start(f"reward-{name}", ["serve", "reward"], args=args)
                figures = asyncio.run(_load(service.target, service.metrics_port, rounds))
                figures["config"] = knobs
                figures["load_average_1m_after"] = round(os.getloadavg()[0], 2)  # the machine is shared
                result[name] = figures
                launcher.stop(f"reward-{name}")
                print(f"   {name}: {figures}", flush=True)
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
        f"{s['callers']} concurrent callers, one pair per request, {s['rounds']} requests each after a warm-up; "
        f"{s['model']}, {s['torch_threads']} torch threads; 1-minute load average before the run "
        f"{result['load_average_1m_before']} (a shared machine inflates every figure).\n\n"
        + "\n".join(rows)
        + f"\n\nThroughput ratio (micro-batching / one forward per request): {result['speedup']}x\n"
    )
