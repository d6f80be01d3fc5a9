"""The PPO job's pieces without services: the prompts of each iteration, the bench summary."""

from __future__ import annotations

from rlhf.trainer.ppo import iteration_prompts


def test_iteration_prompts_cover_every_prompt_once_per_pass_and_are_reproducible():
    first_pass = [i for it in range(5) for i in iteration_prompts(10, 2, it, seed=7)]
    assert sorted(first_pass) == list(range(10))
    assert iteration_prompts(10, 2, 3, seed=7) == iteration_prompts(10, 2, 3, seed=7)
    assert iteration_prompts(10, 2, 5, seed=7) != iteration_prompts(10, 2, 0, seed=7)  # new order next pass
