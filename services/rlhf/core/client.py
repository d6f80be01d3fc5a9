"""Client side, written once: channels (TLS, bearer token, message size) and the one retry policy.

Targets may name many replicas: ``host:port``, a comma-separated list ``a:5001,b:5001``, or a DNS name that
resolves to every replica (``dns:///rlhf-generation-headless.ml.svc:50051``, a headless Service). Calls are
spread over them by gRPC's own client-side load balancing (``round_robin``); a retried call goes to the next
replica, so a replica that dies costs a retry. :func:`replica_addresses` lists them one by one, for what must
reach every replica (a weight push).

Retry policy: calls that fail with UNAVAILABLE (server restarting, still loading) or RESOURCE_EXHAUSTED
(queue full) are retried with exponential backoff and jitter until ``retry_timeout`` seconds have passed;
every attempt has its own deadline. Other codes are the caller's to handle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.core.server import client_options

log = logging.getLogger("rlhf.client")
T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter on retryable codes, bounded by total time."""

    retry_timeout: float = 60.0  # seconds of retrying before giving up (0 = no retries)
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retryable: frozenset = RETRYABLE

    def backoffs(self):
        delay = self.initial_backoff
        while True:
            yield random.uniform(0, delay)
            delay = min(self.max_backoff, delay * self.multiplier)


def _token_interceptors(token: str | None, aio: bool):
    if not token:
        return []
    md = (("authorization", f"Bearer {token}"),)

    if aio:

        class AioTokenInterceptor(
            grpc.aio.UnaryUnaryClientInterceptor,
            grpc.aio.UnaryStreamClientInterceptor,
            grpc.aio.StreamUnaryClientInterceptor,
        ):
            def _details(self, d):
                return d._replace(metadata=tuple(d.metadata or ()) + md)

            async def intercept_unary_unary(self, continuation, d, request):
                return await continuation(self._details(d), request)

            async def intercept_unary_stream(self, continuation, d, request):
                return await continuation(self._details(d), request)

            async def intercept_stream_unary(self, continuation, d, request_iterator):
                return await continuation(self._details(d), request_iterator)

        return [AioTokenInterceptor()]

    class TokenInterceptor(
        grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor
    ):
        def _details(self, d):
            return _Details(
                d.method, d.timeout, tuple(d.metadata or ()) + md, d.credentials, d.wait_for_ready
            )

        def intercept_unary_unary(self, continuation, d, request):
            return continuation(self._details(d), request)

        def intercept_unary_stream(self, continuation, d, request):
            return continuation(self._details(d), request)

        def intercept_stream_unary(self, continuation, d, request_iterator):
            return continuation(self._details(d), request_iterator)

    return [TokenInterceptor()]


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready = credentials, wait_for_ready


#: gRPC's client-side load balancing over every address a target resolves to.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def replica_addresses(target: str) -> list[str]:
    """Every replica ``target`` names, as ``ip:port`` (``[ip]:port`` for IPv6), sorted and deduplicated.

    ``a:1,b:2`` -> each resolved; ``dns:///name:port`` (or ``dns:name:port``) -> every address of the name
    (a headless Service's pods); ``host:port`` -> its addresses (IPv4 when it has both families). A name that
    does not resolve raises ``ValueError`` naming it.
    """
    text = target.removeprefix("dns:").lstrip("/") if target.startswith("dns:") else target
    out = set()
    for part in (p for p in text.split(",") if p.strip()):
        host, port = _host_port(part)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"target {target!r}: {host!r} does not resolve ({exc.strerror})") from exc
        v4 = {f"{info[4][0]}:{port}" for info in infos if info[0] == socket.AF_INET}
        v6 = {f"[{info[4][0]}]:{port}" for info in infos if info[0] == socket.AF_INET6}
        out |= v4 or v6  # a host with both families is one replica reached twice: take IPv4
    return sorted(out)


def channel_target(target: str) -> str:
    """The gRPC target for ``target``: a list becomes ``ipv4:``/``ipv6:`` of its resolved addresses (gRPC
    balances over them); ``dns:///...`` and ``host:port`` pass unchanged (gRPC's resolver finds every address)."""
    if "," not in target:
        return target
    addresses = replica_addresses(target)
    if all(not a.startswith("[") for a in addresses):
        return "ipv4:" + ",".join(addresses)
    return "ipv6:" + ",".join(
        a if a.startswith("[") else f"[::ffff:{a.rsplit(':', 1)[0]}]:{a.rsplit(':', 1)[1]}" for a in addresses
    )


def _credentials(tls_ca_file: str | None, tls: bool) -> grpc.ChannelCredentials | None:
    if not (tls or tls_ca_file):
        return None
    root = Path(tls_ca_file).read_bytes() if tls_ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=root)


def make_channel(
    target: str,
    *,
    token: str | None = None,
    tls: bool = False,
    tls_ca_file: str | None = None,
    max_message_mb: int = 64,
    aio: bool = False,
):
    """A channel to ``target`` (host:port, a list, or dns:///name:port) with the bearer token attached to every
    call, balancing calls round-robin over every address the target names."""
    options = [*client_options(max_message_mb), ("grpc.service_config", ROUND_ROBIN)]
    target = channel_target(target)
    creds = _credentials(tls_ca_file, tls)
    interceptors = _token_interceptors(token, aio)
    if aio:
        if creds:
            return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    channel = (
        grpc.secure_channel(target, creds, options=options)
        if creds
        else grpc.insecure_channel(target, options=options)
    )
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def _retry_delay(exc: grpc.RpcError, policy: RetryPolicy, start: float, backoffs, what: str) -> float | None:
    """Seconds to wait before trying again, or None when ``exc`` is final (a code not retried, or out of time)."""
    code = exc.code() if hasattr(exc, "code") else None
    elapsed = time.monotonic() - start
    if code not in policy.retryable or elapsed >= policy.retry_timeout:
        return None
    delay = min(next(backoffs), max(0.0, policy.retry_timeout - elapsed))
    log.warning("%s failed with %s (%s); retrying in %.2fs", what, code.name, exc.details(), delay)
    return delay


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy | None = None, what: str = "call") -> T:
    """Run ``fn`` (a blocking gRPC call) and retry it on retryable codes per ``policy``."""
    policy = policy or RetryPolicy()
    start = time.monotonic()
    backoffs = policy.backoffs()
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            delay = _retry_delay(exc, policy, start, backoffs, what)
            if delay is None:
                raise
            time.sleep(delay)


async def acall_with_retry(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy | None = None, what: str = "call"
) -> T:
    """Async variant of :func:`call_with_retry`."""
    policy = policy or RetryPolicy()
    start = time.monotonic()
    backoffs = policy.backoffs()
    while True:
        try:
            return await fn()
        except grpc.RpcError as exc:
            delay = _retry_delay(exc, policy, start, backoffs, what)
            if delay is None:
                raise
            await asyncio.sleep(delay)


def wait_for_serving(
    target: str, timeout: float = 120.0, service: str = "", token: str | None = None
) -> None:
    """Block until the standard health service at ``target`` reports SERVING (raises TimeoutError)."""
    deadline = time.monotonic() + timeout
    with make_channel(target, token=token) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)
