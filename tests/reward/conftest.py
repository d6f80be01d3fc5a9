"""Fixtures of the reward service tests: an in-process RewardService on a tiny random reward model."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import pytest

from rlhf.core.server import ServerHandle, ServerThread
from rlhf.reward.checkpoint import save_reward_checkpoint
from rlhf.reward.client import RewardClient
from rlhf.reward.config import RewardConfig
from rlhf.reward.server import RewardServicer, service_def


@dataclass
class RunningServer:
    target: str
    servicer: RewardServicer
    handle: ServerHandle
    config: RewardConfig
    loop: asyncio.AbstractEventLoop

    def client(self, **kw) -> RewardClient:
        return RewardClient(self.target, **kw)


@contextlib.contextmanager
def running_server(model, **config_kw):
    """A reward server in a background thread of this process (port 0), stopped on exit."""
    config = RewardConfig(
        **{
            "model": str(model) if model else None,
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": -1,
            "metrics_host": "127.0.0.1",
            "grace_seconds": 2,
            "torch_threads": 1,
            **config_kw,
        }
    )
    servicer = RewardServicer(config)
    with ServerThread(
        config,
        [service_def(servicer)],
        load=servicer.load,
        on_shutdown=servicer.shutdown,
        name="reward-server",
    ) as running:
        yield RunningServer(running.target, servicer, running.handle, config, running.loop)


@pytest.fixture(scope="session")
def rm_with_stats(tiny_rm_path, tmp_path_factory):
    """The tiny reward model saved as a full reward checkpoint (mean/std, version "tiny-v1")."""
    from rlhf.core.models import load_reward_model, load_tokenizer

    folder = tmp_path_factory.mktemp("rm-stats") / "tiny-v1"
    return save_reward_checkpoint(
        load_reward_model(tiny_rm_path),
        load_tokenizer(tiny_rm_path),
        folder,
        reward_mean=0.25,
        reward_std=2.0,
        version="tiny-v1",
        extra={"base_model": "tiny", "eval_accuracy": 0.5},
    )


@pytest.fixture(scope="session")
def second_rm(tmp_path_factory):
    """A different tiny reward model (another seed) with version "tiny-v2"."""
    from rlhf.core.models import load_reward_model, load_tokenizer, make_tiny_reward_model

    raw = make_tiny_reward_model(tmp_path_factory.mktemp("rm2-raw"), seed=1)
    folder = tmp_path_factory.mktemp("rm2") / "tiny-v2"
    return save_reward_checkpoint(
        load_reward_model(raw),
        load_tokenizer(raw),
        folder,
        reward_mean=0.0,
        reward_std=1.0,
        version="tiny-v2",
    )


@pytest.fixture
def server(rm_with_stats):
    with running_server(rm_with_stats, max_wait_ms=20) as running:
        yield running


@pytest.fixture
def client(server):
    with server.client(timeout=30) as c:
        yield c
