"""The labeling web page: a Flask app over a :class:`~rlhf.labeling.queue.LabelingQueue`.

Server-rendered Jinja templates (autoescaped: prompts and responses are shown as text, never as HTML), plain
HTML forms that work without JavaScript, and a few lines of vanilla JS for keyboard shortcuts. A labeler signs
in with a personal token (``labeling_tokens_file``); the session cookie is signed, HttpOnly and SameSite=Lax,
and every form carries a CSRF token (:mod:`.auth`).

Submitting goes through :meth:`LabelingQueue.submit` — the store's validated, idempotent write path — and the
page answers only after the transaction committed (:mod:`.views`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flask import Flask

from rlhf.labeling import auth, views
from rlhf.labeling.metrics import QUEUE_DEPTH
from rlhf.labeling.queue import LabelingQueue


@dataclass
class LabelingState:
    """What the views share, kept in ``app.extensions["rlhf_labeling"]``."""

    queue: LabelingQueue
    book: auth.TokenBook
    admins: set[str] = field(default_factory=set)
    low_agreement: float = 0.6
    min_pairs: int = 5

    def refresh_depth(self) -> int:
        """Set the queue-depth gauge from the database; returns the depth."""
        depth = self.queue.judgments_needed()
        QUEUE_DEPTH.set(depth)
        return depth


def create_app(
    queue: LabelingQueue,
    *,
    tokens_file: str | None,
    admins: Iterable[str] = (),
    service_tokens: Iterable[str] = (),
    secret_key_file: str | None = None,
    low_agreement: float = 0.6,
    min_pairs: int = 5,
) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=auth.secret_key(secret_key_file),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        MAX_CONTENT_LENGTH=4 * 1024 * 1024,
    )
    app.extensions["rlhf_labeling"] = LabelingState(
        queue, auth.TokenBook(tokens_file, service_tokens), set(admins), low_agreement, min_pairs
    )
    auth.install(app)
    views.add_views(app)
    return app


def labeling_state(app: Flask) -> LabelingState:
    return app.extensions["rlhf_labeling"]
