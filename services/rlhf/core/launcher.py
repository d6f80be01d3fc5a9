"""Start platform services as local processes and stop them cleanly (the demo, benchmarks, tests).

Each service runs ``python -m rlhf.cli serve <name> --port 0 --port-file F ...`` in its own process group; the
launcher reads the bound ports from F, waits for the standard health service to say SERVING, and on exit
(normal, exception, Ctrl-C or SIGTERM) sends SIGTERM to every group, waits, then SIGKILLs stragglers. No
process is left behind. Every process gets :data:`rlhf.core.config.PROCESS_ENV_DEFAULTS` (OpenMP threads that
sleep when they wait) unless the environment already sets those variables.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.core.client import wait_for_serving
from rlhf.core.config import set_process_env_defaults

log = logging.getLogger("rlhf.launcher")


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None


class Launcher:
    """Context manager owning a set of service processes."""

    def __init__(self, workdir: str | os.PathLike | None = None, env: dict[str, str] | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="rlhf-services-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = set_process_env_defaults({**os.environ, **(env or {})})
        self.services: dict[str, ServiceProcess] = {}
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> Launcher:
        # SIGTERM to the launcher behaves like Ctrl-C: unwind, stopping the services on the way out.
        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def start(
        self,
        name: str,
        command: list[str],
        *,
        args: list[str] | None = None,
        timeout: float = 300.0,
        token: str | None = None,
        env: dict[str, str] | None = None,
        program: list[str] | None = None,
    ) -> ServiceProcess:
        """Start ``rlhf <command...> <args...>`` (or ``program`` instead of ``rlhf``) on free ports; wait for SERVING."""
        port_file = self.workdir / f"{name}.ports.json"
        port_file.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        argv = [
            *(program or [sys.executable, "-m", "rlhf.cli"]),
            *command,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--port-file",
            str(port_file),
            *(args or []),
        ]
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while starting; see {log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                _terminate(proc)
                raise TimeoutError(f"{name} did not bind a port within {timeout:.0f}s; see {log_path}")
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        service = ServiceProcess(name, proc, ports["port"], ports["metrics_port"], log_path, argv)
        self.services[name] = service
        try:
            wait_for_serving(service.target, timeout=max(1.0, deadline - time.monotonic()), token=token)
        except TimeoutError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while loading; see {log_path}:\n{_tail(log_path)}"
                ) from None
            raise
        log.info(
            "%s SERVING on %s (metrics :%d, log %s)", name, service.target, service.metrics_port, log_path
        )
        return service

    def stop(self, name: str, timeout: float = 30.0) -> int | None:
        service = self.services.pop(name, None)
        if service is None:
            return None
        return _terminate(service.proc, timeout)

    def stop_all(self, timeout: float = 30.0) -> None:
        for name in list(self.services)[::-1]:
            self.stop(name, timeout)


def _terminate(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into a KeyboardInterrupt inside a Launcher, so the services are stopped on the way out;
    ``signum`` gives the caller its exit status (128 + signum, as a killed process would have)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_keyboard_interrupt(signum, frame):
    raise Interrupted(signum)
