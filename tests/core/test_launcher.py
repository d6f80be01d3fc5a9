"""The launcher starts a service process, waits for SERVING and leaves no process behind."""

import os
import sys
from pathlib import Path

import pytest

from rlhf.core.launcher import Launcher

SCAFFOLD = [sys.executable, str(Path(__file__).with_name("scaffold_server.py"))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_services_stop_when_the_block_fails(tmp_path):
    launcher = Launcher(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with launcher:
            first = launcher.start("one", [], program=SCAFFOLD)
            second = launcher.start("two", [], program=SCAFFOLD)
            assert first.alive() and second.alive() and first.port != second.port
            raise RuntimeError("boom")
    assert not _alive(first.proc.pid) and not _alive(second.proc.pid)
    assert first.proc.returncode == 0  # stopped by SIGTERM, drained, exited cleanly
    assert launcher.services == {}


def test_a_service_that_dies_while_starting_is_reported(tmp_path):
    with Launcher(tmp_path) as launcher:
        with pytest.raises(RuntimeError, match="exited with"):
            launcher.start("bad", [], program=SCAFFOLD, args=["--max-message-mb", "0"])


PRINT_OMP_AND_EXIT = [
    sys.executable,
    "-c",
    "import os, sys; print('OMP_WAIT_POLICY=' + os.environ.get('OMP_WAIT_POLICY', 'unset')); sys.exit(3)",
]


@pytest.mark.parametrize(("user_value", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_child_processes_get_passive_openmp_waiting_unless_the_user_chose(
    tmp_path, monkeypatch, user_value, seen
):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if user_value is not None:
        monkeypatch.setenv("OMP_WAIT_POLICY", user_value)
    with Launcher(tmp_path) as launcher:
        with pytest.raises(RuntimeError, match=f"OMP_WAIT_POLICY={seen}\\b"):
            launcher.start("env", [], program=PRINT_OMP_AND_EXIT)
