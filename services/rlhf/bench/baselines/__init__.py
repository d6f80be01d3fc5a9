"""Baseline trainers timed by `make bench-rl`. These scripts run inside their own virtual environments (TRL and its
pinned dependencies are never dependencies of the platform) and must not import ``rlhf``."""
