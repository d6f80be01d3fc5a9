"""Fixtures of the demo tests: a real feedback store process (SQLite) started with the Launcher."""

from __future__ import annotations

import pytest

from rlhf.core.launcher import Launcher
from rlhf.feedback.client import FeedbackClient


@pytest.fixture(scope="module")
def feedback_target(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("feedback-service")
    with Launcher(workdir) as launcher:
        service = launcher.start(
            "feedback", ["serve", "feedback"], args=["--database-url", f"sqlite:///{workdir}/feedback.db"]
        )
        yield service.target


@pytest.fixture
def feedback_client(feedback_target):
    with FeedbackClient(feedback_target) as client:
        yield client
