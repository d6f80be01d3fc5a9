"""rlhf.core.server.ServerThread: a server in a background thread of the test process."""

import asyncio
import threading

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.core.client import make_channel, wait_for_serving
from rlhf.core.config import ServerConfig
from rlhf.core.server import ServerThread, ServiceDef
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

CONFIG = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1)


class Servicer(trainer_pb2_grpc.TrainerServiceServicer):
    async def GetStatus(self, request, context):
        return trainer_pb2.GetStatusResponse(status=trainer_pb2.JobStatus(job_id="thread", step=3))


def _service() -> ServiceDef:
    return ServiceDef(
        "rlhf.v1.TrainerService", Servicer(), trainer_pb2_grpc.add_TrainerServiceServicer_to_server
    )


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_loading_then_serving_then_graceful_stop():
    gate = threading.Event()
    shut_down = []

    async def load(handle):
        while not gate.is_set():
            await asyncio.sleep(0.01)

    async def on_shutdown(handle):
        shut_down.append(handle.port)

    running = ServerThread(CONFIG, [_service()], load=load, on_shutdown=on_shutdown, name="test-server")
    running.start(wait_serving=False)
    assert running.port > 0 and running.target == f"127.0.0.1:{running.port}"
    with make_channel(running.target) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING  # start() did not wait for load
        gate.set()
        wait_for_serving(running.target, timeout=30)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        assert stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5).status.step == 3
    running.stop()
    assert shut_down == [running.port]
    assert not any(t.name == "test-server" for t in threading.enumerate())


def test_context_manager_waits_for_serving():
    with ServerThread(CONFIG, [_service()]) as running, make_channel(running.target) as channel:
        assert running.handle.ready.is_set()
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert running.handle.stop_requested.is_set()


def test_a_load_failure_is_raised_by_start():
    async def load(handle):
        raise ValueError("model: no such file")

    running = ServerThread(CONFIG, [_service()], load=load, name="failing-server")
    with pytest.raises(ValueError, match="model: no such file"):
        running.start()
    assert not any(t.name == "failing-server" for t in threading.enumerate())
