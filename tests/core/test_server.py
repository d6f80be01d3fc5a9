"""The shared server scaffolding, exercised from another process as a client would."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rlhf.core.client import make_channel
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

SERVER = Path(__file__).with_name("scaffold_server.py")


def _start(tmp_path: Path, *extra: str):
    port_file = tmp_path / "ports.json"
    gate = tmp_path / "gate"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SERVER),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
            "--metrics-host",
            "127.0.0.1",
            "--port-file",
            str(port_file),
            "--gate-file",
            str(gate),
            "--grace-seconds",
            "10",
            *extra,
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        assert proc.poll() is None, "server exited early"
        assert time.monotonic() < deadline, "server did not bind"
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    return proc, ports, gate


def _health(channel) -> int:
    return (
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    )


def _wait_serving(channel, timeout=30):
    deadline = time.monotonic() + timeout
    while _health(channel) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@pytest.fixture
def server(tmp_path):
    proc, ports, gate = _start(tmp_path)
    yield proc, ports, gate
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_health_reflection_metrics_validation_and_graceful_sigterm(server):
    proc, ports, gate = server
    target = f"127.0.0.1:{ports['port']}"
    with grpc.insecure_channel(target) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        # Loading: health says NOT_SERVING and the service answers UNAVAILABLE.
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.touch()
        _wait_serving(channel)

        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "rlhf.v1.TrainerService" in services
        assert "grpc.health.v1.Health" in services

        assert stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5).status.step == 7
        text = _metrics(ports["metrics_port"])
        assert (
            'rlhf_grpc_server_requests_total{code="OK",method="GetStatus",service="rlhf.v1.TrainerService"} 1.0'
            in text
        )
        assert 'rlhf_grpc_server_request_duration_seconds_count{code="OK",method="GetStatus"' in text

        with pytest.raises(grpc.RpcError) as err:
            stub.Stop(trainer_pb2.StopRequest(reason="x" * 40), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("reason:")
        assert proc.poll() is None  # a bad request never takes the server down

        # SIGTERM while a slow call is in flight: the call completes, then the process exits 0.
        result = {}

        def slow_call():
            try:
                result["response"] = stub.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(), timeout=30)
            except grpc.RpcError as exc:  # pragma: no cover - reported by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=slow_call)
        thread.start()
        deadline = time.monotonic() + 10
        while (
            'rlhf_grpc_server_in_flight_requests{method="SaveCheckpoint",service="rlhf.v1.TrainerService"} 1.0'
            not in _metrics(ports["metrics_port"])
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        thread.join(30)
        assert "error" not in result, result.get("error")
        assert result["response"].checkpoint.step == 7
        assert proc.wait(30) == 0


def test_bearer_token_required_except_health(tmp_path):
    proc, ports, gate = _start(tmp_path, "--auth-token", "s3cret")
    gate.touch()
    target = f"127.0.0.1:{ports['port']}"
    try:
        with grpc.insecure_channel(target) as channel:
            _wait_serving(channel)  # health needs no token
            with pytest.raises(grpc.RpcError) as err:
                trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
                    trainer_pb2.GetStatusRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with make_channel(target, token="wrong") as channel:
            with pytest.raises(grpc.RpcError) as err:
                trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
                    trainer_pb2.GetStatusRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with make_channel(target, token="s3cret") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            assert stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5).status.job_id == "scaffold"
            steps = [
                r.status.step for r in stub.StreamProgress(trainer_pb2.StreamProgressRequest(), timeout=5)
            ]
            assert steps == [0, 1, 2]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.mark.parametrize(
    "setting, message",
    [
        ("empty-file", "holds no token"),
        ("comments-only-file", "holds no token"),
        ("missing-file", "cannot read"),
        ("blank-token", "auth_token: blank"),
    ],
)
def test_auth_fails_closed_when_its_source_holds_no_token(tmp_path, setting, message):
    """A configured token source with no token refuses to start (exit 2, one line) instead of serving openly."""
    token_file = tmp_path / "token"
    if setting == "empty-file":
        token_file.write_text("")
    elif setting == "comments-only-file":
        token_file.write_text("# rotated out\n\n")
    args = ["--auth-token", "   "] if setting == "blank-token" else ["--auth-token-file", str(token_file)]
    result = subprocess.run(
        [sys.executable, str(SERVER), "--port", "0", "--metrics-port", "-1", *args],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "extra, says", [((), "auth OFF, TLS off"), (("--auth-token", "s3cret"), "auth on, TLS off")]
)
def test_the_start_log_says_whether_auth_and_tls_are_on(tmp_path, extra, says):
    port_file, log_file = tmp_path / "ports.json", tmp_path / "server.log"
    argv = [sys.executable, str(SERVER), "--port", "0", "--metrics-port", "-1", "--log-format", "text"]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [*argv, "--port-file", str(port_file), "--gate-file", str(tmp_path / "gate"), *extra],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while says not in log_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.05)
        assert "s3cret" not in log_file.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
