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
