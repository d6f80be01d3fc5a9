"""The one atomic-write helper: readers see the old or the new version, never a half-written one."""

import pytest

from rlhf.core.files import atomic_folder, atomic_path, atomic_write_text


def test_atomic_write_text_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "step-1\n")
    atomic_write_text(target, "step-2\n", fsync=True)
    assert target.read_text() == "step-2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_atomic_folder_swaps_the_whole_folder(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "stale.bin").write_text("x")
    with atomic_folder(target, fsync=True) as tmp:
        assert not target.with_name(tmp.name).samefile(target)
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_atomic_folder_leaves_the_old_folder_when_the_writer_fails(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    with pytest.raises(ValueError), atomic_folder(target) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise ValueError("save failed")
    assert (target / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
