"""The install is pinned: requirements.lock agrees with pyproject.toml, the images' locks take its pins, and the
environment the suite runs in is the locked one (so `make install` put back anything upgraded by hand)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]


def parse_lock(path: Path) -> dict[str, dict]:
    """``{name: {"version", "hashes", "via"}}`` of a `uv pip compile --generate-hashes` output."""
    entries: dict[str, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9._\[\],-]+)==(\S+)", line)
        if pin:
            name = canonicalize_name(pin.group(1).split("[")[0])
            current = entries[name] = {"version": pin.group(2), "hashes": [], "via": []}
        elif current is not None and "--hash=sha256:" in line:
            current["hashes"].append(line.split("--hash=sha256:")[1].strip(" \\"))
        elif current is not None and line.strip().startswith("#"):
            text = line.strip().lstrip("#").strip()
            text = text.removeprefix("via").strip()
            if text:
                current["via"].append(text)
    return entries


def direct_requirements(extras: list[str]) -> list[Requirement]:
    """The project's own requirements: core + the given extras (followed through self-references)."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    requirements = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                requirements.append(req)
    return requirements


def in_files(*names: str) -> list[Requirement]:
    reqs = []
    for name in names:
        for line in (REPO / "deploy" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                reqs.append(Requirement(line.strip()))
    return reqs


LOCK = parse_lock(REPO / "requirements.lock")
ALL_EXTRAS = list(PYPROJECT["project"]["optional-dependencies"])
LOCKS = {
    # lock file: (its direct requirements, what each `via` line naming the project reads)
    "requirements.lock": (direct_requirements(ALL_EXTRAS) + in_files("lock-model.in", "lock-build.in")),
    "deploy/requirements-serve.lock": direct_requirements(["labeling", "k8s"]) + in_files("lock-build.in"),
    "deploy/requirements-cuda.lock": direct_requirements(["labeling", "k8s"]) + in_files("lock-build.in"),
}


@pytest.mark.parametrize("lock_name", list(LOCKS))
def test_every_requirement_of_pyproject_is_pinned_in_the_lock_within_its_range(lock_name):
    lock = parse_lock(REPO / lock_name)
    for req in LOCKS[lock_name]:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is required but not in {lock_name}: run `make lock`"
        version = Version(lock[name]["version"])
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock_name} pins {req.name}=={version}, outside pyproject's {req.specifier}: run `make lock`"
        )


@pytest.mark.parametrize("lock_name", list(LOCKS))
def test_the_lock_holds_nothing_pyproject_no_longer_asks_for(lock_name):
    lock = parse_lock(REPO / lock_name)
    wanted = {canonicalize_name(r.name) for r in LOCKS[lock_name]}
    for name, entry in lock.items():
        assert entry["via"], f"{name} in {lock_name} says nothing of why it is there"
        direct = any(v.startswith(PROJECT) or v.startswith("-r deploy/") for v in entry["via"])
        if direct:
            assert name in wanted, f"{name} is in {lock_name} but pyproject.toml no longer asks for it"
        else:  # a dependency of a dependency: whoever pulled it in is locked too
            parents = [canonicalize_name(v.split()[0]) for v in entry["via"] if not v.startswith("-")]
            assert any(p in lock for p in parents), f"{name} in {lock_name}: pulled in by {entry['via']}"


@pytest.mark.parametrize("lock_name", list(LOCKS))
def test_every_locked_package_has_a_hash(lock_name):
    for name, entry in parse_lock(REPO / lock_name).items():
        assert entry["hashes"], f"{name} has no hash in {lock_name}: pip --require-hashes refuses it"


def test_the_images_take_the_pins_of_requirements_lock():
    for lock_name in ("deploy/requirements-serve.lock", "deploy/requirements-cuda.lock"):
        for name, entry in parse_lock(REPO / lock_name).items():
            if lock_name.endswith("cuda.lock") and (name == "torch" or name not in LOCK):
                continue  # the CUDA torch and its nvidia-* libraries: the CPU lock has neither
            assert name in LOCK, f"{name} is in {lock_name} but not in requirements.lock"
            assert entry["version"] == LOCK[name]["version"], (name, lock_name)
            assert set(entry["hashes"]) & set(LOCK[name]["hashes"]), (name, lock_name)


def test_the_cpu_lock_takes_the_cpu_build_of_torch_and_the_cuda_lock_the_cuda_build():
    assert LOCK["torch"]["version"].endswith("+cpu")
    cuda = parse_lock(REPO / "deploy" / "requirements-cuda.lock")
    assert cuda["torch"]["version"] == LOCK["torch"]["version"].removesuffix("+cpu")
    assert any(name.startswith("nvidia-") for name in cuda)
    assert not any(name.startswith("nvidia-") for name in LOCK)


def test_the_environment_is_the_locked_one():
    """`make install` syncs the lock before every `make test`: a package upgraded by hand is put back."""
    wrong = []
    for name, entry in LOCK.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed (locked {entry['version']})")
            continue
        if Version(installed) != Version(entry["version"]):
            wrong.append(f"{name}: {installed} installed, {entry['version']} locked")
    assert not wrong, "run `make install`:\n" + "\n".join(wrong)


def test_the_grpc_runtime_is_at_least_the_version_that_generated_the_code():
    import grpc

    generated = set()
    for path in (REPO / "services" / "rlhf" / "v1").glob("*_pb2_grpc.py"):
        match = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", path.read_text())
        assert match, path
        generated.add(match.group(1))
    assert len(generated) == 1, f"generated by several grpcio-tools versions: {generated}: run `make protos`"
    assert Version(grpc.__version__) >= Version(generated.pop())
    assert importlib.metadata.version("grpcio-tools") == LOCK["grpcio-tools"]["version"]
