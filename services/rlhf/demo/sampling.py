"""Samples from the policy generation service (through ``PolicyClient``), as the labelers and the
evaluation take them."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rlhf.demo.config import DemoConfig
from rlhf.demo.progress import progress_bar
from rlhf.demo.task import sample_finished
from rlhf.generation.client import PolicyClient
from rlhf.v1 import policy_pb2


@dataclass
class Generated:
    prompt: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool


def _generated(prompt: str, sample: policy_pb2.Sample) -> Generated:
    return Generated(
        prompt=prompt,
        # the store and the reward service refuse NUL characters (a tiny random model can sample one); a
        # reader would not see it either
        text=sample.text.replace("\x00", ""),
        token_ids=list(sample.token_ids),
        logprobs=list(sample.logprobs),
        finished=sample_finished(sample),
    )


def generate(
    policy: PolicyClient,
    prompts: Sequence[str],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch: int,
    desc: str,
    progress: bool,
) -> list[list[Generated]]:
    """``n`` samples per prompt from the generation service, grouped by prompt.

    One request per prompt, up to ``batch`` sequences (``batch // n`` requests) in flight (the service batches
    concurrent requests into shared forward passes: on a CPU 64 sequences per decode step give 1.5x the samples
    per second of 16). Each prompt has its own seed (``seed`` + its index): the service seeds a sample from
    (request seed, sample index), so prompts sharing one request would share their random draws. On any error
    or Ctrl-C the requests not yet sent are dropped; the ones in flight end when the client's channel closes.
    """

    def sample(index: int) -> list[policy_pb2.Sample]:
        return policy.generate(
            [prompts[index]],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed * 100_003 + index,
            n=n,
            return_prompt_token_ids=False,
        )

    out: list[list[Generated]] = []
    executor = ThreadPoolExecutor(max_workers=max(1, batch // n), thread_name_prefix="demo-generate")
    try:
        futures = [executor.submit(sample, i) for i in range(len(prompts))]
        with progress_bar(len(prompts) * n, desc, progress) as bar:
            for prompt, future in zip(prompts, futures, strict=True):
                samples = future.result()
                out.append([_generated(prompt, s) for s in samples])
                bar.update(len(samples))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    return out


def sample(
    settings: DemoConfig,
    policy: PolicyClient,
    prompts: Sequence[str],
    *,
    n: int,
    seed_stream: int,
    desc: str,
    temperature: float | None = None,
) -> list[list[Generated]]:
    """:func:`generate` with the run's sizes: ``n`` samples per prompt from random stream ``seed_stream`` of
    the run's seed, at ``temperature`` (default: the run's sampling temperature)."""
    return generate(
        policy,
        prompts,
        n=n,
        max_new_tokens=settings.response_length,
        temperature=settings.temperature if temperature is None else temperature,
        seed=settings.seed * 1000 + seed_stream,
        batch=settings.generation_batch,
        desc=desc,
        progress=settings.progress,
    )
