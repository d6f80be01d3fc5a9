"""The pure layer of PPO: tensors in, tensors out; no gRPC, no files.

math.py      the RL math (logprobs, KL, rewards, GAE, RLOO, PPO losses, KL controllers)
rollout.py   a rollout as tensors (Rollout, build_rollout)
forward.py   the policy / value head / reference forwards on a rollout
learner.py   PPOLearner: one scored rollout in, one PPO update out
"""
