"""Who may use the labeling page: labeler tokens from a file, the signed session, CSRF tokens on every form,
and the security headers of every response (a CSP nonce lets only our own script block run)."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

from flask import Flask, Response, abort, current_app, g, request, session

from rlhf.feedback.validation import LABELER_ID

log = logging.getLogger("rlhf.labeling")


class TokenBook:
    """Labeler tokens from a file of ``LABELER_ID TOKEN`` lines, re-read whenever the file changes."""

    def __init__(self, path: str | None, service_tokens: Iterable[str] = ()):
        self.path = Path(path) if path else None
        self.service_tokens = [t for t in service_tokens if t]
        self._mtime: float | None = None
        self._tokens: dict[str, str] = {}  # token -> labeler id
        self._lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        with self._lock:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                self._tokens, self._mtime = _parse_tokens(self.path), mtime
            return self._tokens

    def labeler_for(self, token: str) -> str | None:
        """The labeler id a token signs in as (constant-time comparison), else None."""
        found = None
        for known, labeler_id in self._load().items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = labeler_id
        return found

    def is_service_token(self, token: str) -> bool:
        return any(hmac.compare_digest(t.encode(), token.encode()) for t in self.service_tokens)

    def has_labeler(self, labeler_id: str) -> bool:
        return labeler_id in self._load().values()


def _parse_tokens(path: Path) -> dict[str, str]:
    """token -> labeler id from a tokens file; malformed lines are logged and skipped."""
    tokens = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            log.warning("%s:%d: expected 'LABELER_ID TOKEN'; line ignored", path, n)
            continue
        if not LABELER_ID.match(parts[0]):
            log.warning("%s:%d: labeler id is not 1-128 chars of [A-Za-z0-9._:@-]; ignored", path, n)
            continue
        tokens[parts[1]] = parts[0]
    return tokens


def secret_key(path: str | None) -> bytes:
    """The session-signing key from a file, else a random one (sessions end when the process does)."""
    if path:
        return Path(path).read_bytes().strip()
    return os.urandom(32)


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def csp_nonce() -> str:
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(16)
    return g.csp_nonce


def security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    # Only our own script block (it carries this response's nonce) may run, never one inside the data.
    response.headers.setdefault(
        "Content-Security-Policy",
        f"default-src 'self'; script-src 'nonce-{csp_nonce()}'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'",
    )
    return response


def check_csrf() -> None:
    if request.method == "POST":
        sent = request.form.get("csrf", "")
        if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
            abort(400, "the form expired or came from another site; reload the page and try again")


def current_labeler() -> str | None:
    """The signed-in labeler, while their token is still in the tokens file."""
    labeler_id = session.get("labeler_id")
    if labeler_id and not current_app.extensions["rlhf_labeling"].book.has_labeler(labeler_id):
        session.pop("labeler_id", None)  # token revoked since sign-in
        return None
    return labeler_id


def is_admin() -> bool:
    if session.get("service_admin"):
        return True
    labeler_id = current_labeler()
    return labeler_id is not None and labeler_id in current_app.extensions["rlhf_labeling"].admins


def install(app: Flask) -> None:
    """CSRF checks, security headers and the template helpers on ``app``."""
    app.before_request(check_csrf)
    app.after_request(security_headers)
    app.jinja_env.globals.update(csrf_token=csrf_token, csp_nonce=csp_nonce, is_admin=is_admin)
