"""The labeling page's views: sign in, label (one task at a time), skip, the admins' overview and export.

Each form posts, then redirects (POST/redirect/GET), so a reload never posts again; a repeated post (double
click, back + resubmit) finds the judgment already stored.
"""

from __future__ import annotations

import datetime as dt
import io
import logging

from flask import (
    Flask,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from rlhf.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServiceError
from rlhf.feedback import jsonl
from rlhf.labeling.auth import current_labeler, is_admin
from rlhf.labeling.metrics import QUEUE_DEPTH, count_judgment
from rlhf.labeling.tasks import Judgment
from rlhf.v1 import feedback_pb2

log = logging.getLogger("rlhf.labeling")


def _state():
    """The app's :class:`rlhf.labeling.app.LabelingState`."""
    return current_app.extensions["rlhf_labeling"]


def start_of_today_us() -> int:
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(today.timestamp() * 1_000_000)


def healthz():
    return {"status": "ok"}


def index():
    if current_labeler():
        return redirect(url_for("label"))
    if session.get("service_admin"):
        return redirect(url_for("overview"))
    return redirect(url_for("login"))


def login():
    book = _state().book
    if request.method == "GET":
        return render_template("login.html", configured=book.path is not None)
    token = request.form.get("token", "").strip()
    labeler_id = book.labeler_for(token) if token else None
    if labeler_id:
        session.clear()
        session["labeler_id"] = labeler_id
        _register_labeler(labeler_id)
        log.info("labeler %s signed in", labeler_id)
        return redirect(url_for("label"))
    if token and book.is_service_token(token):
        session.clear()
        session["service_admin"] = True
        return redirect(url_for("overview"))
    log.warning("refused a sign-in with an unknown token from %s", request.remote_addr)
    return render_template("login.html", configured=book.path is not None, error="Unknown token."), 401


def logout():
    session.clear()
    return redirect(url_for("login"))


def label():
    labeler_id = current_labeler()
    if labeler_id is None:
        return redirect(url_for("login"))
    queue = _state().queue
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


def submit(task_id: str):
    labeler_id = current_labeler()
    if labeler_id is None:
        return redirect(url_for("login"))
    try:
        result = _state().queue.submit(judgment_from_form(task_id, labeler_id, request.form))
    except AlreadyExists:
        flash("You already answered this task differently; your first answer is kept.", "error")
        return redirect(url_for("label"))
    except (InvalidArgument, FailedPrecondition, NotFound) as exc:
        flash(str(exc), "error")
        return redirect(url_for("label"))
    if result.created:
        count_judgment(result)
        flash("Saved.", "ok")
    else:
        flash("Already saved; nothing was duplicated.", "ok")
    _state().refresh_depth()
    return redirect(url_for("label"))


def skip(task_id: str):
    labeler_id = current_labeler()
    if labeler_id is None:
        return redirect(url_for("login"))
    try:
        _state().queue.skip(task_id, labeler_id)
        flash("Skipped.", "ok")
    except FailedPrecondition as exc:
        flash(str(exc), "error")
    return redirect(url_for("label"))


def overview():
    if not (current_labeler() or session.get("service_admin")):
        return redirect(url_for("login"))
    if not is_admin():
        abort(403, "the overview is for the project's admins (labeling_admins)")
    state = _state()
    data = state.queue.overview(
        since_us=start_of_today_us(), low_agreement=state.low_agreement, min_pairs=state.min_pairs
    )
    QUEUE_DEPTH.set(data.judgments_needed)
    return render_template(
        "overview.html",
        data=data,
        low_agreement=state.low_agreement,
        min_pairs=state.min_pairs,
        fmt_time=_fmt_time,
    )


def export():
    if not is_admin():
        abort(403, "export is for the project's admins (labeling_admins)")
    queue = _state().queue

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


def service_error(exc: ServiceError):
    return render_template("error.html", message=exc.message), 400


ROUTES = [  # (rule, view, methods); a view's endpoint is its name, as the templates' url_for() expects
    ("/healthz", healthz, ["GET"]),
    ("/", index, ["GET"]),
    ("/login", login, ["GET", "POST"]),
    ("/logout", logout, ["POST"]),
    ("/label", label, ["GET"]),
    ("/label/<task_id>", submit, ["POST"]),
    ("/label/<task_id>/skip", skip, ["POST"]),
    ("/overview", overview, ["GET"]),
    ("/export.jsonl", export, ["GET"]),
]


def add_views(app: Flask) -> None:
    for rule, view, methods in ROUTES:
        app.add_url_rule(rule, view_func=view, methods=methods)
    app.register_error_handler(ServiceError, service_error)


def _register_labeler(labeler_id: str) -> None:
    """Make the labeler known to the store (kind human) without touching details set elsewhere."""
    store = _state().queue.store
    if not store.has_labeler(labeler_id):
        store.add_labelers([feedback_pb2.Labeler(id=labeler_id, kind="human")])


def _int_field(form, name: str) -> int | None:
    value = form.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(name, f"{value[:20]!r} is not a whole number") from None


def judgment_from_form(task_id: str, labeler_id: str, form) -> Judgment:
    """The judgment a label form posts: ``chosen``, ``rank-<i>`` (1 = best), ``score``, ``reason``."""
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
