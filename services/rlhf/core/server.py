"""One server bootstrap for every rlhf service.

``run_server`` builds a grpc.aio server with:
- the standard health service (NOT_SERVING while the ``load`` hook runs, SERVING after, NOT_SERVING on shutdown)
  and server reflection;
- interceptors: bearer-token auth (every RPC except health), a readiness gate (UNAVAILABLE while loading),
  per-RPC Prometheus metrics, and translation of :class:`rlhf.core.errors.ServiceError` into statuses;
- a Prometheus ``/metrics`` HTTP endpoint;
- message-size and concurrency limits, optional TLS;
- graceful shutdown on SIGTERM/SIGINT: stop accepting calls, let in-flight calls finish within
  ``grace_seconds``, run the ``on_shutdown`` hook, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from rlhf.core.auth import AuthConfigError, read_auth_tokens
from rlhf.core.config import ServerConfig
from rlhf.core.errors import ServiceError
from rlhf.core.files import atomic_write_text
from rlhf.core.logs import log_fields, setup_logging

log = logging.getLogger("rlhf.server")

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

# Latency buckets from 1 ms to ~5 min: covers a health check as well as a long generation batch.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RPC_REQUESTS = Counter(
    "rlhf_grpc_server_requests",
    "gRPC calls handled, by method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "rlhf_grpc_server_request_duration_seconds",
    "gRPC call latency from receipt to the last response message, by method and status code.",
    ["service", "method", "code"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("rlhf_grpc_server_in_flight_requests", "gRPC calls in progress.", ["service", "method"])
SERVER_READY = Gauge("rlhf_server_ready", "1 when the server reports SERVING, else 0.", ["service"])


@dataclass
class ServiceDef:
    """A servicer to mount: its full proto name and the generated ``add_XServicer_to_server`` function."""

    name: str  # e.g. "rlhf.v1.RewardService"
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


def _split_method(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/")
    return service, method


class UndecodableRequest:
    """Stands in for a request whose bytes are not a valid message; the interceptor answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception):
        self.message = f"request: not a valid protobuf message ({error})"


def _tolerant(deserializer):
    """A deserializer that returns :class:`UndecodableRequest` instead of raising (grpc would say UNKNOWN)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # google.protobuf.message.DecodeError, bad UTF-8 in a string field...
            return UndecodableRequest(exc)

    return deserialize


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """Rebuild ``handler`` with its behaviour wrapped; unary responses via wrap_unary, streams via wrap_stream."""
    kw = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    single = dict(kw, request_deserializer=_tolerant(handler.request_deserializer))
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **single)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **single)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kw)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Auth, readiness gate, error translation and metrics for every RPC, in that order."""

    def __init__(self, tokens: set[str], ready: asyncio.Event):
        self._tokens = tokens
        self._ready = ready

    def _check_auth(self, method: str, metadata) -> str | None:
        if not self._tokens or method.startswith(f"/{HEALTH_SERVICE}/"):
            return None
        header = dict(metadata or ()).get("authorization", "")
        if not header.lower().startswith("bearer "):
            return "missing 'authorization: Bearer <token>' metadata"
        token = header[7:].strip()
        if not any(hmac.compare_digest(token, t) for t in self._tokens):
            return "invalid bearer token"
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        rpc = _ObservedRpc(
            method,
            auth_error=self._check_auth(method, handler_call_details.invocation_metadata),
            gated=not (method.startswith(f"/{HEALTH_SERVICE}/") or method.startswith(REFLECTION_PREFIXES)),
            ready=self._ready,
        )

        def wrap_unary(behavior):
            async def wrapper(request, context):
                async with rpc.observed(request, context):
                    return await behavior(request, context)

            return wrapper

        def wrap_stream(behavior):
            async def wrapper(request, context):
                async with rpc.observed(request, context):
                    async for response in behavior(request, context):
                        yield response

            return wrapper

        return _wrap_handler(handler, wrap_unary, wrap_stream)


class _ObservedRpc:
    """One RPC method's checks (auth, readiness, decodable request), error translation and metrics."""

    def __init__(self, method: str, *, auth_error: str | None, gated: bool, ready: asyncio.Event):
        self.method = method
        self.service, self.name = _split_method(method)
        self.auth_error = auth_error
        self.gated = gated
        self.ready = ready

    async def check(self, request, context) -> None:
        if self.auth_error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.auth_error)
        if self.gated and not self.ready.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is loading; retry shortly")
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    @contextlib.asynccontextmanager
    async def observed(self, request, context):
        """Around the handler: checks first; a ServiceError becomes its status, anything else INTERNAL."""
        start = time.perf_counter()
        RPC_IN_FLIGHT.labels(self.service, self.name).inc()
        code = None
        try:
            await self.check(request, context)
            try:
                yield
            except ServiceError as exc:
                code = exc.code
                await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if not isinstance(exc, grpc.aio.AbortError):
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", self.method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            raise
        finally:
            self.finish(context, start, code)

    def finish(self, context, start: float, code: grpc.StatusCode | None) -> None:
        code_name = (code or context.code() or grpc.StatusCode.OK).name
        RPC_REQUESTS.labels(self.service, self.name, code_name).inc()
        RPC_LATENCY.labels(self.service, self.name, code_name).observe(time.perf_counter() - start)
        RPC_IN_FLIGHT.labels(self.service, self.name).dec()


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    size = config.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
    ]


def client_options(max_message_mb: int = 64) -> list[tuple[str, Any]]:
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


class ServerHandle:
    """What a running server exposes to its hooks: the bound ports, health, and a way to stop it."""

    def __init__(self, config: ServerConfig, service_names: Sequence[str]):
        self.config = config
        self.service_names = list(service_names)
        self.port: int = 0
        self.metrics_port: int = -1
        self.ready = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.health = health_aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)
        for name in self.service_names:
            SERVER_READY.labels(name).set(1 if serving else 0)
        if serving:
            self.ready.set()
        else:
            self.ready.clear()

    def request_stop(self) -> None:
        self.stop_requested.set()


def build_server(
    config: ServerConfig, services: Sequence[ServiceDef], handle: ServerHandle
) -> grpc.aio.Server:
    """The gRPC server with the interceptor, ``services``, health and reflection, bound to its port (set on
    ``handle``; TLS when the config names a certificate and key)."""
    tokens = read_auth_tokens(config)
    names = [s.name for s in services]
    server = grpc.aio.server(
        interceptors=[ServerInterceptor(tokens, handle.ready)],
        options=server_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    for s in services:
        s.add_to_server(s.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(handle.health, server)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert_file and config.tls_key_file:
        creds = grpc.ssl_server_credentials(
            [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())]
        )
        handle.port = server.add_secure_port(address, creds)
    else:
        handle.port = server.add_insecure_port(address)
    return server


async def run_server(
    config: ServerConfig,
    services: Sequence[ServiceDef],
    *,
    load: Callable[[ServerHandle], Awaitable[None]] | None = None,
    on_shutdown: Callable[[ServerHandle], Awaitable[None]] | None = None,
    install_signal_handlers: bool = True,
    handle: ServerHandle | None = None,
) -> ServerHandle:
    """Serve ``services`` until SIGTERM/SIGINT (or ``handle.request_stop()``), then drain and return."""
    setup_logging(config.log_level, config.log_format)
    if "torch" in sys.modules:  # services that compute with torch import it before serving
        sys.modules["torch"].set_num_threads(config.torch_threads)
    names = [s.name for s in services]
    handle = handle or ServerHandle(config, names)
    server = build_server(config, services, handle)
    if config.metrics_port >= 0:
        http_server, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
        handle.metrics_port = http_server.server_port
    await handle.set_serving(False)
    await server.start()
    if config.port_file:
        _write_port_file(config.port_file, handle)
    log.info(
        "listening",
        extra=log_fields(
            services=names,
            port=handle.port,
            metrics_port=handle.metrics_port,
            tls=bool(config.tls_cert_file),
            auth=bool(config.auth_token or config.auth_token_file),
        ),
    )
    log.info(
        "gRPC on port %d (auth %s, TLS %s), metrics on port %d; loading",
        handle.port,
        "on" if config.auth_token or config.auth_token_file else "OFF",
        "on" if config.tls_cert_file else "off",
        handle.metrics_port,
    )

    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handle.request_stop)

    load_task = asyncio.ensure_future(load(handle)) if load else None
    stop_task = asyncio.ensure_future(handle.stop_requested.wait())
    try:
        if load_task:
            done, _ = await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if load_task in done:
                load_task.result()  # raise a load failure
        if not handle.stop_requested.is_set():
            await handle.set_serving(True)
            log.info("SERVING on port %d", handle.port)
            await stop_task
    finally:
        log.info("shutting down: draining in-flight calls for up to %.1fs", config.grace_seconds)
        await handle.set_serving(False)
        if load_task and not load_task.done():
            load_task.cancel()
        await server.stop(config.grace_seconds)
        if on_shutdown:
            await on_shutdown(handle)
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
    return handle


def _write_port_file(path: str, handle: ServerHandle) -> None:
    # readers (the launcher, tests) never see a half-written file
    atomic_write_text(
        path, json.dumps({"port": handle.port, "metrics_port": handle.metrics_port, "pid": os.getpid()})
    )


def serve_forever(config: ServerConfig, services: Sequence[ServiceDef], **kwargs) -> None:
    """Blocking entry point for ``rlhf serve ...``: run the server in a fresh event loop.

    A configuration that must not start (auth configured without a token) ends the process with one line on
    stderr and exit code 2, before any port is bound."""
    try:
        read_auth_tokens(config)
    except AuthConfigError as exc:
        print(f"rlhf serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(run_server(config, services, **kwargs))


class ServerThread:
    """Run a server in a background thread of this process, for tests and embedding.

    ``run_server`` gets its own event loop in a daemon thread (no signal handlers: the host process owns
    them). ``start()`` returns once the server is bound and, by default, SERVING, and re-raises a startup or
    ``load`` failure in the caller; ``stop()`` asks for the usual graceful shutdown (drain, ``on_shutdown``)
    and joins the thread. Also a context manager::

        with ServerThread(config, [service_def(servicer)], load=servicer.load) as running:
            client = SomeClient(running.target)
    """

    def __init__(
        self,
        config: ServerConfig,
        services: Sequence[ServiceDef],
        *,
        load: Callable[[ServerHandle], Awaitable[None]] | None = None,
        on_shutdown: Callable[[ServerHandle], Awaitable[None]] | None = None,
        name: str = "rlhf-server",
    ):
        self.config = config
        self.services = list(services)
        self.handle: ServerHandle | None = None  # made on the server's own loop, set once the thread runs
        self.loop: asyncio.AbstractEventLoop | None = None
        self._load = load
        self._on_shutdown = on_shutdown
        self._started = threading.Event()  # bound and accepting calls (the load hook has begun)
        self._serving = threading.Event()  # health SERVING
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._returned = False  # start() has returned: a later failure is logged, there is no one to raise to
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def port(self) -> int:
        return self.handle.port if self.handle is not None else 0

    @property
    def target(self) -> str:
        """``host:port`` to dial from this process (a wildcard bind address is dialled on 127.0.0.1)."""
        host = self.config.host if self.config.host not in ("", "0.0.0.0", "::", "[::]") else "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self, timeout: float = 60.0, *, wait_serving: bool = True) -> ServerThread:
        """Start the thread; return when bound (and SERVING if ``wait_serving``), or raise why it is not."""
        self._thread.start()
        self._wait(self._started, "start", timeout)
        if wait_serving:
            self._wait(self._serving, "become SERVING", timeout)
        self._returned = True
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown (in-flight calls drain for ``grace_seconds``), then join the thread."""
        if self.loop is not None and self.handle is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                self.loop.call_soon_threadsafe(self.handle.request_stop)
        if self._thread.is_alive():
            self._thread.join(self.config.grace_seconds + 30 if timeout is None else timeout)

    def __enter__(self) -> ServerThread:
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait(self, event: threading.Event, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not event.wait(0.01):
            if self._finished.is_set():
                self._thread.join()
                if self._error is not None:
                    raise self._error
                raise RuntimeError(f"server {self._thread.name} stopped before it could {what}")
            if time.monotonic() > deadline:
                self.stop(timeout=5)
                raise TimeoutError(f"server {self._thread.name} did not {what} within {timeout:g}s")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - re-raised by start(), or logged once it has returned
            self._error = exc
            if self._returned:
                log.exception("server %s failed", self._thread.name)
        finally:
            self._finished.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.handle = ServerHandle(self.config, [s.name for s in self.services])

        async def load(handle: ServerHandle) -> None:
            self._started.set()
            if self._load is not None:
                await self._load(handle)

        async def watch_serving() -> None:
            await self.handle.ready.wait()
            self._serving.set()

        watcher = asyncio.ensure_future(watch_serving())
        try:
            await run_server(
                self.config,
                self.services,
                load=load,
                on_shutdown=self._on_shutdown,
                install_signal_handlers=False,
                handle=self.handle,
            )
        finally:
            watcher.cancel()
