"""The labeling app through Flask's test client (no browser): sign-in, CSRF, admin pages, bad form input,
metrics."""

from __future__ import annotations

import html as html_lib
import json
import re

import pytest
from prometheus_client import REGISTRY

from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.app import create_app
from rlhf.labeling.queue import LabelingQueue
from rlhf.labeling.tasks import TaskSpec


@pytest.fixture
def setup(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("ann ann-secret\nboss boss-secret\n")
    with FeedbackStore(f"sqlite:///{tmp_path}/f.db") as store:
        queue = LabelingQueue(store, redundancy=2)
        ids = queue.enqueue(
            [
                TaskSpec("first <i>prompt</i>", ["<img src=x onerror=alert(1)>", "plain"]),
                TaskSpec("rank", list("xyz")),
            ]
        ).ids
        app = create_app(queue, tokens_file=str(tokens), admins=["boss"], service_tokens=["svc-token"])
        yield app, queue, store, list(ids), tokens


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def sign_in(client, token: str):
    csrf = csrf_of(client.get("/login").text)
    return client.post("/login", data={"token": token, "csrf": csrf})


def flashes(html: str) -> list[str]:
    return [html_lib.unescape(m) for m in re.findall(r'class="flash \w+"[^>]*>([^<]*)<', html)]


def count(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_unknown_tokens_and_forms_without_csrf_are_refused(setup):
    app, *_ = setup
    client = app.test_client()
    assert client.get("/label").location.endswith("/login")
    assert sign_in(client, "guess").status_code == 401
    assert client.post("/login", data={"token": "ann-secret"}).status_code == 400  # no CSRF token
    response = sign_in(client, "ann-secret")
    assert response.status_code == 302 and response.location.endswith("/label")
    page = client.get("/label")
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", page.headers["Content-Security-Policy"]).group(1)
    assert f'<script nonce="{nonce}">' in page.text
    task_id = re.search(r'action="/label/(task_\w+)"', page.text).group(1)
    assert client.post(f"/label/{task_id}", data={"chosen": "0", "csrf": "forged"}).status_code == 400


def test_text_is_escaped_and_a_judgment_is_counted_once(setup):
    app, queue, store, ids, _ = setup
    client = app.test_client()
    sign_in(client, "ann-secret")
    page = client.get("/label").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<img src=x" not in page
    assert "first &lt;i&gt;prompt&lt;/i&gt;" in page
    before = (count("rlhf_labeling_judgments_total"), count("rlhf_labeling_judgment_seconds_count"))
    csrf = csrf_of(page)
    for _ in range(2):
        client.post(f"/label/{ids[0]}", data={"chosen": "1", "score": "4", "reason": "ok", "csrf": csrf})
    assert flashes(client.get("/label").text) == ["Saved.", "Already saved; nothing was duplicated."]
    assert count("rlhf_labeling_judgments_total") == before[0] + 1
    assert count("rlhf_labeling_judgment_seconds_count") == before[1] + 1
    assert count("rlhf_labeling_queue_depth") == queue.judgments_needed() == 3
    client.post(f"/label/{ids[0]}", data={"chosen": "0", "csrf": csrf})
    assert "first answer is kept" in flashes(client.get("/label").text)[0]
    assert len(list(store.export(kinds=["comparison"]))) == 1


@pytest.mark.parametrize(
    "form, message",
    [
        ({"chosen": "one"}, "chosen: 'one' is not a whole number"),
        ({}, "chosen_index: required"),
        ({"chosen": "5"}, "chosen_index: 5 out of range"),
        ({"rank-0": "1", "rank-1": "1", "rank-2": "2"}, "ranking: two responses share a rank"),
        ({"rank-0": "2", "rank-1": "1"}, "ranking: [1, 0] does not rank each of the 3 responses once"),
        ({"chosen": "0", "score": "9"}, "score: 9 is not on the 1-7 scale"),
    ],
)
def test_bad_answers_are_shown_and_nothing_is_stored(setup, form, message):
    app, queue, store, ids, _ = setup
    client = app.test_client()
    sign_in(client, "ann-secret")
    csrf = csrf_of(client.get("/label").text)
    client.post(f"/label/{ids[0]}", data={"chosen": "0", "csrf": csrf})
    assert re.search(rf'action="/label/{ids[1]}"', client.get("/label").text)
    client.post(f"/label/{ids[1]}", data={**form, "csrf": csrf})
    page = client.get("/label").text
    assert message in flashes(page)[0]
    assert re.search(rf'action="/label/{ids[1]}"', page)  # the same task again
    assert len(list(store.export(kinds=["comparison"]))) == 1


def test_a_full_ranking_is_stored(setup):
    app, queue, store, ids, _ = setup
    client = app.test_client()
    sign_in(client, "ann-secret")
    csrf = csrf_of(client.get("/label").text)
    client.post(f"/label/{ids[0]}/skip", data={"csrf": csrf})  # skip the pair, get the 3-way task
    client.get("/label")
    client.post(f"/label/{ids[1]}", data={"rank-0": "3", "rank-1": "1", "rank-2": "2", "csrf": csrf})
    [response] = store.export(kinds=["comparison"])
    assert list(response.comparison.ranking) == [1, 2, 0] and response.comparison.chosen_index == 1


def test_overview_and_export_are_for_admins(setup):
    app, queue, store, ids, _ = setup
    ann = app.test_client()
    sign_in(ann, "ann-secret")
    assert ann.get("/overview").status_code == 403
    assert ann.get("/export.jsonl").status_code == 403
    csrf = csrf_of(ann.get("/label").text)
    ann.post(f"/label/{ids[0]}", data={"chosen": "1", "csrf": csrf})
    for token in ("boss-secret", "svc-token"):  # an admin labeler, or the service's own bearer token
        admin = app.test_client()
        sign_in(admin, token)
        page = admin.get("/overview")
        assert page.status_code == 200 and 'data-labeler="ann"' in page.text
        lines = [json.loads(line) for line in admin.get("/export.jsonl").text.splitlines()]
        assert [(x["chosen"], x["rejected"], x["labeler_id"]) for x in lines] == [
            ("plain", "<img src=x onerror=alert(1)>", "ann")
        ]


def test_a_revoked_token_ends_the_session(setup):
    app, queue, store, ids, tokens = setup
    client = app.test_client()
    sign_in(client, "ann-secret")
    assert client.get("/label").status_code == 200
    tokens.write_text("boss boss-secret\n# ann left the project\n")
    assert client.get("/label").location.endswith("/login")
    assert sign_in(client, "ann-secret").status_code == 401


def test_without_a_tokens_file_nobody_signs_in(tmp_path):
    with FeedbackStore(f"sqlite:///{tmp_path}/f.db") as store:
        app = create_app(LabelingQueue(store), tokens_file=None)
        client = app.test_client()
        assert "No labeler tokens are configured" in client.get("/login").text
        assert sign_in(client, "anything").status_code == 401
