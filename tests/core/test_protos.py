"""The generated code in services/rlhf/v1 matches the protos (run `make protos` when this fails)."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path):
    written = _load_generator().generate(tmp_path)
    committed = ROOT / "services" / "rlhf" / "v1"
    assert written
    for path in written:
        assert (committed / path.name).exists(), f"{path.name} missing: run `make protos`"
        assert (committed / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run `make protos`"
        )


@pytest.mark.skipif(shutil.which("buf") is None, reason="buf (PyPI buf-bin) not installed")
def test_buf_lint_is_clean():
    result = subprocess.run(["buf", "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
