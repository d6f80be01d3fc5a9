"""The labeling web page: a Flask app over a :class:`LabelingQueue`.

Server-rendered Jinja templates (autoescaped: prompts and responses are shown as text, never as HTML), plain
HTML forms that work without JavaScript, and a few lines of vanilla JS for keyboard shortcuts. A labeler signs
in with a personal token (``labeling_tokens_file``); the session cookie is signed, HttpOnly and SameSite=Lax,
and every form carries a CSRF token.

Submitting goes through :meth:`LabelingQueue.submit` — the store's validated, idempotent write path — and the
page answers only after the transaction committed; then it redirects (POST/redirect/GET), so a reload never
posts again, and a repeated post (double click, back + resubmit) finds the judgment already stored.
"""

from __future__ import annotations

import datetime as dt
import hmac
import io
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

from flask import Flask, Response, abort, flash, g, redirect, render_template, request, session, url_for
from prometheus_client import Counter, Gauge, Histogram

from rlhf.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServiceError
from rlhf.feedback import jsonl
from rlhf.feedback.labeling import Judgment, LabelingQueue
from rlhf.feedback.validation import LABELER_ID
from rlhf.v1 import feedback_pb2

log = logging.getLogger("rlhf.labeling")

JUDGMENTS = Counter("rlhf_labeling_judgments", "Judgments stored from the labeling page (replays excluded).")
JUDGMENT_SECONDS = Histogram(
    "rlhf_labeling_judgment_seconds",
    "Time a labeler spent on a judgment: from being given the task to submitting it.",
    buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800),
)
QUEUE_DEPTH = Gauge("rlhf_labeling_queue_depth", "Judgments the labeling queue still waits for.")


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
                tokens = {}
                for n, line in enumerate(self.path.read_text().splitlines(), start=1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    parts = line.split()
                    if len(parts) != 2:
                        log.warning("%s:%d: expected 'LABELER_ID TOKEN'; line ignored", self.path, n)
                        continue
                    if not LABELER_ID.match(parts[0]):
                        log.warning(
                            "%s:%d: labeler id is not 1-128 chars of [A-Za-z0-9._:@-]; ignored", self.path, n
                        )
                        continue
                    tokens[parts[1]] = parts[0]
                self._tokens, self._mtime = tokens, mtime
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


def start_of_today_us() -> int:
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(today.timestamp() * 1_000_000)


def _secret_key(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes().strip()
    return os.urandom(32)


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
        SECRET_KEY=_secret_key(secret_key_file),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        MAX_CONTENT_LENGTH=4 * 1024 * 1024,
    )
    book = TokenBook(tokens_file, service_tokens)
    admin_ids = set(admins)
    store = queue.store

    def refresh_depth() -> int:
        depth = queue.judgments_needed()
        QUEUE_DEPTH.set(depth)
        return depth

    app.extensions["rlhf_labeling"] = {"queue": queue, "refresh_depth": refresh_depth}

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(24)
        return session["csrf"]

    app.jinja_env.globals["csrf_token"] = csrf_token

    def csp_nonce() -> str:
        if "csp_nonce" not in g:
            g.csp_nonce = secrets.token_urlsafe(16)
        return g.csp_nonce

    app.jinja_env.globals["csp_nonce"] = csp_nonce

    @app.after_request
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

    @app.before_request
    def check_csrf():
        if request.method == "POST":
            sent = request.form.get("csrf", "")
            if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
                abort(400, "the form expired or came from another site; reload the page and try again")

    def current_labeler() -> str | None:
        labeler_id = session.get("labeler_id")
        if labeler_id and not book.has_labeler(labeler_id):  # token revoked since sign-in
            session.pop("labeler_id", None)
            return None
        return labeler_id

    def is_admin() -> bool:
        if session.get("service_admin"):
            return True
        labeler_id = current_labeler()
        return labeler_id is not None and labeler_id in admin_ids

    app.jinja_env.globals["is_admin"] = is_admin

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/")
    def index():
        if current_labeler():
            return redirect(url_for("label"))
        if session.get("service_admin"):
            return redirect(url_for("overview"))
        return redirect(url_for("login"))

    @app.route("/login", methods=["GET", "POST"])
    def login():
        if request.method == "GET":
            return render_template("login.html", configured=book.path is not None)
        token = request.form.get("token", "").strip()
        labeler_id = book.labeler_for(token) if token else None
        if labeler_id:
            session.clear()
            session["labeler_id"] = labeler_id
            _register_labeler(store, labeler_id)
            log.info("labeler %s signed in", labeler_id)
            return redirect(url_for("label"))
        if token and book.is_service_token(token):
            session.clear()
            session["service_admin"] = True
            return redirect(url_for("overview"))
        log.warning("refused a sign-in with an unknown token from %s", request.remote_addr)
        return render_template("login.html", configured=book.path is not None, error="Unknown token."), 401

    @app.post("/logout")
    def logout():
        session.clear()
        return redirect(url_for("login"))

    @app.get("/label")
    def label():
        labeler_id = current_labeler()
        if labeler_id is None:
            return redirect(url_for("login"))
        task = queue.next_task(labeler_id)
        progress = queue.progress(labeler_id, start_of_today_us())
        QUEUE_DEPTH.set(progress.judgments_needed)
        return render_template(
            "label.html",
            labeler_id=labeler_id,
            task=task,
            progress=progress,
            prompt_messages=_prompt_messages(task.prompt) if task else [],
            scale=range(1, 8),
        )

    @app.post("/label/<task_id>")
    def submit(task_id: str):
        labeler_id = current_labeler()
        if labeler_id is None:
            return redirect(url_for("login"))
        try:
            judgment = _judgment_from_form(task_id, labeler_id, request.form)
            result = queue.submit(judgment)
        except AlreadyExists:
            flash("You already answered this task differently; your first answer is kept.", "error")
            return redirect(url_for("label"))
        except (InvalidArgument, FailedPrecondition, NotFound) as exc:
            flash(str(exc), "error")
            return redirect(url_for("label"))
        if result.created:
            JUDGMENTS.inc()
            if result.seconds is not None:
                JUDGMENT_SECONDS.observe(result.seconds)
            _count_records(result.created_by_kind)
            flash("Saved.", "ok")
        else:
            flash("Already saved; nothing was duplicated.", "ok")
        refresh_depth()
        return redirect(url_for("label"))

    @app.post("/label/<task_id>/skip")
    def skip(task_id: str):
        labeler_id = current_labeler()
        if labeler_id is None:
            return redirect(url_for("login"))
        try:
            queue.skip(task_id, labeler_id)
            flash("Skipped.", "ok")
        except FailedPrecondition as exc:
            flash(str(exc), "error")
        return redirect(url_for("label"))

    @app.get("/overview")
    def overview():
        if not (current_labeler() or session.get("service_admin")):
            return redirect(url_for("login"))
        if not is_admin():
            abort(403, "the overview is for the project's admins (labeling_admins)")
        data = queue.overview(since_us=start_of_today_us(), low_agreement=low_agreement, min_pairs=min_pairs)
        QUEUE_DEPTH.set(data.judgments_needed)
        return render_template(
            "overview.html", data=data, low_agreement=low_agreement, min_pairs=min_pairs, fmt_time=_fmt_time
        )

    @app.get("/export.jsonl")
    def export():
        if not is_admin():
            abort(403, "export is for the project's admins (labeling_admins)")

        def lines():
            for response in queue.export_judgments():
                buf = io.StringIO()
                jsonl.write_jsonl([response], buf)
                yield buf.getvalue()

        return Response(
            lines(),
            mimetype="application/jsonl",
            headers={"Content-Disposition": "attachment; filename=judgments.jsonl"},
        )

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        return render_template("error.html", message=exc.message), 400

    return app


def _register_labeler(store, labeler_id: str) -> None:
    """Make the labeler known to the store (kind human) without touching details set elsewhere."""
    import sqlalchemy as sa

    from rlhf.feedback.schema import labelers

    with store.engine.connect() as conn:
        exists = conn.execute(sa.select(labelers.c.id).where(labelers.c.id == labeler_id)).first()
    if not exists:
        store.add_labelers([feedback_pb2.Labeler(id=labeler_id, kind="human")])


def _count_records(created_by_kind: dict[str, int]) -> None:
    from rlhf.feedback.server import RECORDS, RECORDS_WRITTEN

    for kind, n in created_by_kind.items():
        RECORDS_WRITTEN.labels(kind).inc(n)
        RECORDS.labels(kind).inc(n)


def _int_field(form, name: str) -> int | None:
    value = form.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(name, f"{value[:20]!r} is not a whole number") from None


def _judgment_from_form(task_id: str, labeler_id: str, form) -> Judgment:
    chosen = _int_field(form, "chosen")
    ranks = {}
    for name in form:
        if name.startswith("rank-") and form.get(name, "").strip():
            index = _int_field({"i": name[5:]}, "i")
            ranks[index] = _int_field(form, name)
    ranking = None
    if ranks:
        ranking = [i for i, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
        if len(set(ranks.values())) != len(ranks):
            raise InvalidArgument("ranking", "two responses share a rank")
        if chosen is None:
            chosen = ranking[0]
    return Judgment(
        task_id=task_id,
        labeler_id=labeler_id,
        chosen_index=chosen,
        ranking=ranking,
        score=_int_field(form, "score"),
        reason=form.get("reason", "").strip(),
    )


def _prompt_messages(prompt: dict) -> list[dict]:
    if "chat" in prompt:
        return prompt["chat"]
    return [{"role": "user", "content": prompt["text"]}]


def _fmt_time(us: int) -> str:
    if not us:
        return "—"
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
