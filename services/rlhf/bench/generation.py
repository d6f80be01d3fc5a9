"""`python -m rlhf.bench generation`: the policy generation service with the real SmolLM2-135M-Instruct.

Side by side in one run (2 torch threads everywhere, fp32, sampling at temperature 0.7, 48 new tokens):
1. tokens/s of one Generate call with 16 prompts through the service (another process) vs in-process
   ``model.generate`` on the same 16 prompts (left padding, KV cache) — target >= 0.9x;
2. 16 concurrent single-prompt callers vs the same 16 calls one after another — target >= 3x;
3. time to push the full weights: by path from /dev/shm (the PPO trainer's fast path; target <= 1.5 s) and
   streamed as chunks with their SHA-256.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlhf.bench.results import write_result
from rlhf.core.chat import render_prompt
from rlhf.core.launcher import Launcher
from rlhf.core.models import load_causal_lm, load_tokenizer, resolve_model_path, set_torch_threads
from rlhf.generation.client import PolicyClient
from rlhf.generation.weights import unique_tensors

THREADS = 2
MAX_NEW_TOKENS = 48
TEMPERATURE = 0.7
RUNS = int(os.environ.get("RLHF_BENCH_RUNS", "1"))  # timed repetitions (best kept); 1 on a shared machine
PROMPTS = [
    "Write a short review of a restaurant you liked.",
    "Give me three tips for learning to cook.",
    "Tell a short story about a cat who finds a key.",
    "What is the capital of France, and why is it famous?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about the sea.",
    "How do I make a cup of green tea?",
    "Describe a sunny day at the park.",
    "What are the benefits of regular exercise?",
    "Suggest a name for a friendly robot and explain it.",
    "Write a polite email declining a meeting invitation.",
    "Why is the sky blue?",
    "List some fun things to do on a rainy weekend.",
    "Describe your favourite book in two sentences.",
    "How can I be more productive in the morning?",
    "Write a thank-you note to a teacher.",
]


def _count(tokens, eos_ids) -> int:
    n = 0
    for t in tokens:
        n += 1
        if t in eos_ids:
            break
    return n


def in_process_generate(model_path: Path) -> dict:
    set_torch_threads(THREADS)
    model, tok = load_causal_lm(model_path), load_tokenizer(model_path)
    tok.padding_side = "left"
    batch = tok(
        [render_prompt(tok, p) for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False
    )
    eos = {
        tok.eos_token_id,
        *(
            [model.generation_config.eos_token_id]
            if isinstance(model.generation_config.eos_token_id, int)
            else model.generation_config.eos_token_id or []
        ),
    }
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=4, do_sample=False)  # warm-up
        runs = []
        for _ in range(RUNS):
            start = time.perf_counter()
            out = model.generate(**batch, **kwargs)
            seconds = time.perf_counter() - start
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            tokens = sum(_count(row, eos) for row in new)
            runs.append((tokens / seconds, tokens, seconds))
    best = max(runs)
    return {"tokens_per_second": best[0], "tokens": best[1], "seconds": best[2]}


def run(out_dir: Path) -> dict:
    model_path = resolve_model_path(None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {"model": str(model_path), "threads": THREADS, "max_new_tokens": MAX_NEW_TOKENS}
    with Launcher(tempfile.mkdtemp(prefix="bench-generation-")) as launcher:
        service = start_service(launcher)
        # measured back to back (the idle server uses no CPU), so both see the same machine load
        result["in_process_generate_16"] = in_process_generate(model_path)
        with PolicyClient(service.target, timeout=3600) as client:
            result["service_generate_16"] = service_generate(client)
            result["service_vs_in_process"] = (
                result["service_generate_16"]["tokens_per_second"]
                / result["in_process_generate_16"]["tokens_per_second"]
            )
            result["sixteen_callers"] = sixteen_callers(client)
            # weight pushes of the full model (its own weights, so the outputs stay meaningful)
            result["weight_push"] = weight_pushes(client, load_causal_lm(model_path).state_dict())
            assert client.model_info().version == "5"
    write_result(out_dir, "generation", result, markdown_table(result))
    return result


def start_service(launcher: Launcher):
    """``rlhf serve generation`` with the default model, batches of up to 16 prompts, 20 ms batch wait."""
    return launcher.start(
        "generation",
        ["serve", "generation"],
        args=["--model", "default", "--torch-threads", str(THREADS)]
        + ["--max-batch-size", "16", "--batch-wait-ms", "20"],
        env={"RLHF_TORCH_THREADS": str(THREADS)},
        timeout=600,
    )


def service_generate(client: PolicyClient) -> dict:
    """tokens/s of one Generate call with the 16 prompts (best of ``RUNS``), after a warm-up call."""
    client.generate(PROMPTS[:2], max_new_tokens=4, temperature=0.0)  # warm-up
    runs = []
    for seed in range(RUNS):
        start = time.perf_counter()
        response = client.generate_response(
            PROMPTS, seed=seed, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE
        )
        seconds = time.perf_counter() - start
        runs.append((response.completion_tokens / seconds, response.completion_tokens, seconds))
    best = max(runs)
    return {"tokens_per_second": best[0], "tokens": best[1], "seconds": best[2]}


def sixteen_callers(client: PolicyClient) -> dict:
    """16 single-prompt callers: one after another, then all at once."""
    kw = dict(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE)
    start = time.perf_counter()
    sequential_tokens = sum(
        len(client.generate([p], seed=i, **kw)[0].token_ids) for i, p in enumerate(PROMPTS)
    )
    sequential = time.perf_counter() - start
    concurrent_tokens = [0] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def call(i):
        barrier.wait()
        concurrent_tokens[i] = len(client.generate([PROMPTS[i]], seed=i, **kw)[0].token_ids)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = time.perf_counter() - start
    return {
        "sequential_seconds": sequential,
        "sequential_tokens": sequential_tokens,
        "concurrent_seconds": concurrent,
        "concurrent_tokens": sum(concurrent_tokens),
        "speedup": sequential / concurrent,
        "throughput_ratio": (sum(concurrent_tokens) / concurrent) / (sequential_tokens / sequential),
    }


def weight_pushes(client: PolicyClient, state: dict) -> dict:
    """Versions 1-3 pushed by path from /dev/shm (the trainer's fast path), 4-5 streamed as chunks."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = shm / f"rlhf-bench-policy-{os.getpid()}.safetensors"
    try:
        start = time.perf_counter()
        save_file(unique_tensors(state), str(path))
        save_seconds = time.perf_counter() - start
        path_times, server_times = [], []
        for version in (1, 2, 3):
            start = time.perf_counter()
            response = client.update_weights_response(version=version, checkpoint_path=str(path))
            path_times.append(time.perf_counter() - start)
            server_times.append(response.seconds)
        stream_times = []
        for version in (4, 5):
            start = time.perf_counter()
            response = client.update_weights_response(version=version, state_dict=state)
            stream_times.append(time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)
    return {
        "bytes": response.num_bytes,
        "tensors": response.num_tensors,
        "save_to_shm_seconds": save_seconds,
        "path_push_seconds_median": statistics.median(path_times),
        "path_push_server_seconds_median": statistics.median(server_times),
        "path_push_plus_save_seconds": save_seconds + statistics.median(path_times),
        "streamed_push_seconds_median": statistics.median(stream_times),
        "shm": str(shm),
    }


def markdown_table(r: dict) -> str:
    return "\n".join(
        [
            "# Policy generation service (SmolLM2-135M-Instruct, fp32, 2 threads, T=0.7, 48 new tokens)",
            "",
            "| measure | value | target |",
            "| --- | --- | --- |",
            f"| in-process `generate`, 16 prompts | {r['in_process_generate_16']['tokens_per_second']:.1f} tok/s | |",
            f"| service Generate, 16 prompts | {r['service_generate_16']['tokens_per_second']:.1f} tok/s | |",
            f"| service / in-process | {r['service_vs_in_process']:.2f}x | >= 0.9x |",
            f"| 16 callers sequential | {r['sixteen_callers']['sequential_seconds']:.1f} s | |",
            f"| 16 callers concurrent | {r['sixteen_callers']['concurrent_seconds']:.1f} s | |",
            f"| concurrent speed-up | {r['sixteen_callers']['speedup']:.2f}x | >= 3x |",
            f"| weight push by path (/dev/shm) | {r['weight_push']['path_push_seconds_median']:.2f} s | <= 1.5 s |",
            f"| save to /dev/shm + push | {r['weight_push']['path_push_plus_save_seconds']:.2f} s | |",
            f"| weight push streamed (chunks + SHA-256) | {r['weight_push']['streamed_push_seconds_median']:.2f} s | |",
            "",
        ]
    )
