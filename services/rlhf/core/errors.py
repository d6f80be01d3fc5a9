"""Errors a servicer raises; the server's interceptor turns them into gRPC statuses with clear messages.

Servicers and the modules behind them raise these instead of calling ``context.abort`` themselves, so that
the same validation code can be used (and tested) without a server.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with a gRPC status code and a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(ServiceError):
    """A request field is wrong; the message starts with the field's path, e.g. ``prompts[3].text: empty``."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}" if field else why)
        self.field = field
        self.why = why


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServiceDown(Unavailable):
    """A service stayed unavailable (UNAVAILABLE / DEADLINE_EXCEEDED) past the client's retry window.

    ``service`` names it ("generation", "reward"); a job that raises this ends after a checkpoint, and the CLI
    prints the message on one line and exits 1 (an outage: run again with --resume).
    """

    def __init__(self, message: str, service: str = ""):
        super().__init__(message)
        self.service = service


def require(condition: bool, field: str, why: str) -> None:
    """Raise InvalidArgument(field, why) unless condition holds."""
    if not condition:
        raise InvalidArgument(field, why)
