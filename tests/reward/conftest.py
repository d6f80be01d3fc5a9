"""Fixtures of the reward service tests: an in-process RewardService on a tiny random reward model."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

import pytest

from rlhf.core.server import ServerHandle, run_server
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
    box: dict = {}
    started = threading.Event()

    def main():
        async def go():
            box["loop"] = asyncio.get_running_loop()
            box["handle"] = handle = ServerHandle(config, ["rlhf.v1.RewardService"])
            started.set()
            await run_server(
                config,
                [service_def(servicer)],
                load=servicer.load,
                on_shutdown=servicer.shutdown,
                install_signal_handlers=False,
                handle=handle,
            )

        try:
            asyncio.run(go())
        except BaseException as exc:  # surfaced below
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=main, name="reward-server", daemon=True)
    thread.start()
    started.wait(30)
    handle = box.get("handle")
    deadline = time.monotonic() + 30
    while handle is not None and handle.port == 0 and "error" not in box:
        assert time.monotonic() < deadline, "server did not bind"
        time.sleep(0.01)
    if "error" in box:
        raise box["error"]
    target = f"127.0.0.1:{handle.port}"
    while not handle.ready.is_set():  # SERVING (polled: health over TLS would need the certificate here)
        assert "error" not in box, box.get("error")
        assert time.monotonic() < deadline + 60, "server did not load"
        time.sleep(0.01)
    try:
        yield RunningServer(target, servicer, handle, config, box["loop"])
    finally:
        box["loop"].call_soon_threadsafe(handle.request_stop)
        thread.join(30)


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
