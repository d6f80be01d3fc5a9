"""Bearer-token auth of the servers, written once: which tokens a server accepts, failing closed.

Used by every gRPC server (core/server.py) and by the labeling page (labeling/web.py).
"""

from __future__ import annotations

from pathlib import Path

from rlhf.core.config import ServerConfig


class AuthConfigError(ValueError):
    """Auth is configured but yields no usable token: the server refuses to start (it never fails open)."""


def read_auth_tokens(config: ServerConfig) -> set[str]:
    """The bearer tokens a server accepts: ``auth_token`` and the lines of ``auth_token_file`` (no comments).

    Fails closed: a configured source that holds no token (an empty or unreadable file, a blank token) raises
    :class:`AuthConfigError` instead of silently turning auth off. No source configured = auth off."""
    tokens = set()
    if config.auth_token is not None:
        if not config.auth_token.strip():
            raise AuthConfigError("auth_token: blank; refusing to start with auth silently off")
        tokens.add(config.auth_token.strip())
    if config.auth_token_file:
        path = Path(config.auth_token_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise AuthConfigError(f"auth_token_file: cannot read {path}: {exc.strerror}") from exc
        from_file = {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
        if not from_file:
            raise AuthConfigError(f"auth_token_file: {path} holds no token; refusing to start with auth off")
        tokens |= from_file
    return tokens
