import os
import subprocess
import sys

import pytest

from rlhf.cli import COMMANDS, _load, main


def test_console_script_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage: rlhf" in out.stdout


@pytest.mark.parametrize("path", sorted(COMMANDS, key=str), ids=lambda p: " ".join(x for x in p if x))
def test_every_subcommand_has_help(path, capsys):
    command = _load(COMMANDS[path])
    if command is None:
        pytest.skip(f"{COMMANDS[path]} is not part of this build yet")
    with pytest.raises(SystemExit) as exit_info:
        main([x for x in path if x] + ["--help"])
    assert exit_info.value.code == 0
    assert command.help.split()[0] in capsys.readouterr().out


MAIN_THEN_PRINT_ENV = """
import os, sys
from rlhf.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
print("OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "unset"), "torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize(("user_value", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_rlhf_sets_passive_openmp_waiting_before_torch_loads(user_value, seen):
    """libgomp reads OMP_WAIT_POLICY once, when torch is imported: the CLI sets it first, and never overrides."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    out = subprocess.run(
        [sys.executable, "-c", MAIN_THEN_PRINT_ENV], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"OMP_WAIT_POLICY={seen} False"
