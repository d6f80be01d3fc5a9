"""``rlhf serve feedback``'s command: the labeling page is an optional extra."""

from __future__ import annotations

import sys

from rlhf.feedback.cli import _serve
from rlhf.feedback.config import FeedbackConfig


def test_asking_for_the_labeling_page_without_flask_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.delitem(sys.modules, "rlhf.labeling.web", raising=False)
    monkeypatch.setitem(sys.modules, "flask", None)  # as if Flask were not installed
    config = FeedbackConfig(database_url=f"sqlite:///{tmp_path}/feedback.db", labeling_port=0)
    assert _serve(config) == 2
    assert "pip install 'rlhf-platform[labeling]'" in capsys.readouterr().err
