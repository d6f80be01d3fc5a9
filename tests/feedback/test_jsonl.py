"""JSONL in the Hugging Face / TRL formats round-trips through ``rlhf feedback import`` and ``export`` unchanged,
straight into the database and through a running server, on both backends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlhf.cli import main as rlhf
from rlhf.feedback import jsonl
from rlhf.feedback.store import FeedbackStore

SYSTEM = {"role": "system", "content": "You are terse."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Canonical form (see rlhf.feedback.jsonl): fields in that order, optional ones only when set, metadata keys
# sorted; lines without idempotency_key get a key derived from their content, which export leaves out again.
LINES = [
    # preferences: prompt/chosen/rejected, plain text
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {
        "prompt": "Name a colour.",
        "chosen": "Blue.",
        "rejected": "Seven.",
        "chosen_model_version": "policy:3",
        "rejected_model_version": "policy:2",
        "reason": "seven is not a colour",
        "labeler_id": "alice",
        "metadata": {"batch": "7", "ui": "v2"},
        "idempotency_key": "pref-colour",
    },
    # preferences: conversational (chat prompt, completions as one assistant message)
    {
        "prompt": [SYSTEM, user("Say hi in French.")],
        "chosen": [assistant("Bonjour !")],
        "rejected": [assistant("Hello!")],
        "labeler_id": "bob",
    },
    {
        "prompt": [user('Quote: "to be"\n\tor not?'), assistant("…that is the question."), user("Who?")],
        "chosen": [assistant("Shakespeare — Hamlet.")],
        "rejected": [assistant("Goethe\\Faust")],
    },
    # k-way comparisons
    {"prompt": "Rank these.", "responses": ["b", "a", "c"], "ranking": [1, 0, 2], "reason": "alphabetical"},
    {
        "prompt": [user("Best emoji?")],
        "responses": [[assistant("🙂")], [assistant("🚀")], [assistant("日本語")]],
        "chosen_index": 1,
        "model_versions": ["m1", "m2", ""],
        "labeler_id": "carol",
    },
    # demonstrations: prompt/completion, and chat messages
    {"prompt": "Translate 'chat' to English.", "completion": "cat"},
    {"prompt": "Write a haiku.", "completion": "Old pond\nfrog jumps in\nsplash", "model_version": "human"},
    {"messages": [SYSTEM, user("2*3?"), assistant("6")], "labeler_id": "dave", "idempotency_key": "demo-1"},
    {"messages": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Goodbye.")]},
    # ratings
    {"prompt": "Tell a joke.", "completion": "Knock knock.", "score": 5},
    {
        "prompt": [user("Rate me")],
        "completion": [assistant("ok")],
        "score": 0.75,
        "scale": [0, 1],
        "model_version": "policy:9",
        "reason": "fine",
        "labeler_id": "erin",
        "metadata": {"a": "1"},
    },
    {"prompt": "Scale with fractions", "completion": "x", "score": -2.5, "scale": [-3.5, 3.5]},
    # prompts
    {"prompt": "An unlabeled prompt."},
    {"prompt": [SYSTEM, user("A chat prompt")], "source": "seed-set", "metadata": {"topic": "misc"}},
    {"prompt": "A prompt with its own key", "idempotency_key": "prompt-7"},
]


def canonical_file(tmp_path):
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(jsonl.dumps_line(line) + "\n" for line in LINES), encoding="utf-8")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = rlhf(list(argv))
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def test_file_is_canonical():
    """The fixture itself is in canonical form: parsing and re-serialising a line gives it back."""
    for line in LINES:
        (parsed,) = jsonl.read_jsonl([json.dumps(line)])
        assert jsonl.record_line(parsed.kind, parsed.message) == line


def test_import_then_export_gives_the_file_back(database_url, tmp_path, capsys):
    source = canonical_file(tmp_path)
    out = tmp_path / "out.jsonl"
    code, err, _ = run(capsys, "feedback", "import", str(source), "--database-url", database_url)
    assert code == 0, err
    assert f"imported {len(LINES)} records" in err and f"{len(LINES)} new" in err
    code, err, _ = run(capsys, "feedback", "export", "--out", str(out), "--database-url", database_url)
    assert code == 0, err
    assert out.read_bytes() == source.read_bytes()
    # Importing the same file again creates nothing; the export is still the same file.
    code, err, _ = run(capsys, "feedback", "import", str(source), "--database-url", database_url)
    assert code == 0 and "0 new" in err and f"{len(LINES)} already stored" in err
    code, err, _ = run(capsys, "feedback", "export", "--out", str(out), "--database-url", database_url)
    assert out.read_bytes() == source.read_bytes()
    # One kind at a time keeps the lines of that kind, in file order.
    code, err, stdout = run(capsys, "feedback", "export", "--kind", "rating", "--database-url", database_url)
    assert code == 0, err
    ratings = [line for line in LINES if "score" in line]
    assert stdout == "".join(jsonl.dumps_line(r) + "\n" for r in ratings)


def test_round_trip_through_a_running_server(server, tmp_path, capsys):
    source = canonical_file(tmp_path)
    out = tmp_path / "out.jsonl"
    code, err, _ = run(
        capsys, "feedback", "import", str(source), "--target", server.target, "--batch-size", "3"
    )
    assert code == 0, err
    code, err, _ = run(capsys, "feedback", "export", "--out", str(out), "--target", server.target)
    assert code == 0, err
    assert out.read_bytes() == source.read_bytes()


def test_console_command_round_trip(tmp_path):
    """The installed entry point, as a user runs it (stdin in, stdout out)."""
    source = canonical_file(tmp_path)
    url = f"sqlite:///{tmp_path}/cli.db"
    cmd = [sys.executable, "-m", "rlhf.cli", "feedback"]
    imported = subprocess.run(
        [*cmd, "import", "-", "--database-url", url],
        input=source.read_text(encoding="utf-8"),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr
    exported = subprocess.run(
        [*cmd, "export", "--database-url", url], capture_output=True, text=True, encoding="utf-8", timeout=120
    )
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == source.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "score": 3}, "unknown field 'score'"),
        ({"prompt": "p", "completion": "c", "labeler": "x"}, "unknown field 'labeler'"),
        ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "unknown field 'name'"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "p", "completion": "c", "score": 9}, "outside the scale"),
    ],
)
def test_a_bad_line_anywhere_is_named_and_nothing_is_written(database_url, tmp_path, capsys, bad, fragment):
    path = tmp_path / "bad.jsonl"
    lines = [LINES[0], LINES[6], bad, LINES[10]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, err, _ = run(capsys, "feedback", "import", str(path), "--database-url", database_url)
    assert code == 2
    assert "line 3" in err and fragment in err, err
    with FeedbackStore(database_url) as store:
        assert sum(store.stats().records_by_kind.values()) == 0
