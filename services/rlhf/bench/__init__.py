"""Benchmarks of the real paths (`make bench`, ``python -m rlhf.bench``).

Each benchmark module exposes ``run(out_dir: Path) -> dict`` and writes its result with
:func:`rlhf.bench.results.write_result`; ``ppo_iteration`` times PPO iterations through the services for ``rl``.
"""
