"""Checkpoints of a trainer job: what is saved, how it is written atomically, how it is read back.

``checkpoints/step-N`` holds every tracked object (HF models as HF folders, anything else in
``trainer_state.pt``), each rank's RNG state (``rng-rankR.pt``) and the loop's own position; ``latest`` names the
newest. Under torchrun every rank writes its RNG file into the same temporary folder between barriers, so the
folder is published by rank 0 with a rename after :func:`rlhf.core.files.fsync_tree`, not by
``atomic_folder`` (whose temporary name is per process).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from rlhf.core.errors import FailedPrecondition
from rlhf.core.files import atomic_write_text, fsync_tree


def rng_state() -> dict:
    """Every generator's state in types ``torch.load(weights_only=True)`` reads back (no pickled objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); each data-parallel rank gets the same seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the safetensors weights of an HF folder into an existing model (tied weights allowed)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{folder}: unexpected weights {result.unexpected_keys[:5]}")
    loaded = {p.data_ptr() for name, p in model.state_dict().items() if name in state}
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if missing:  # a key missing from the file is fine only when it shares storage with a loaded one (tied)
        raise RuntimeError(f"{folder}: missing weights {missing[:5]}")


class Tracked:
    """An object a job checkpoints: an HF model (saved as an HF folder, with its tokenizer) or a state_dict."""

    def __init__(self, name: str, obj: Any, tokenizer: Any = None):
        self.name = name
        self.obj = obj
        self.tokenizer = tokenizer
        self.is_hf = hasattr(obj, "save_pretrained") and isinstance(obj, torch.nn.Module)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The folder ``checkpoint_dir/latest`` names, when it holds a complete checkpoint."""
    pointer = checkpoint_dir / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_dir / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def new_checkpoint_folder(tmp: Path) -> None:
    """An empty temporary folder for a checkpoint (rank 0, before the ranks write into it)."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def write_tracked(folder: Path, tracked: dict[str, Tracked], record: dict) -> None:
    """HF models as HF folders under ``folder``; every other object's state_dict in trainer_state.pt with
    ``record`` (kind, step, train_state...)."""
    objects = {}
    for name, item in tracked.items():
        if item.is_hf:
            item.obj.save_pretrained(folder / name, safe_serialization=True)
            if item.tokenizer is not None:
                item.tokenizer.save_pretrained(folder / name)
        else:
            objects[name] = item.obj.state_dict()
    torch.save({**record, "objects": objects}, folder / "trainer_state.pt")


def publish_checkpoint(tmp: Path, final: Path) -> None:
    """fsync the written folder, rename it to ``final`` and point ``latest`` at it."""
    fsync_tree(tmp)
    if final.exists():  # the same step saved twice (e.g. a requested and a periodic checkpoint)
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(final.parent / "latest", final.name + "\n", fsync=True)


def restore_tracked(path: Path, tracked: dict[str, Tracked], state: dict) -> None:
    """Load every tracked object from the checkpoint ``path`` (its trainer_state.pt already read: ``state``)."""
    for name, item in tracked.items():
        if item.is_hf:
            load_model_weights(item.obj, path / name)
        elif name in state["objects"]:
            item.obj.load_state_dict(state["objects"][name])
        else:
            raise FailedPrecondition(f"run_dir: {path} has no state for {name!r}")


def restore_rng(path: Path, rank: int, seed: int, step: int) -> None:
    """This rank's RNG states from the checkpoint, or a deterministic seed per rank when it has none."""
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:  # resumed with more ranks than the checkpoint had: seed deterministically per rank
        seed_everything(seed + 1000 * rank + step)


def read_trainer_state(path: Path, kind: str) -> dict:
    """The checkpoint's trainer_state.pt, refused when it belongs to another kind of job."""
    # weights_only: tensors and plain containers only; a file on the shared volume cannot run code in the job
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if state.get("kind") != kind:
        raise FailedPrecondition(f"run_dir: {path} is a {state.get('kind')} checkpoint, not {kind}")
    return state


def prune_checkpoints(checkpoints: list, keep: int) -> list:
    """Delete the folders of all but the newest ``keep`` checkpoints (Checkpoint messages); returns those kept."""
    kept = checkpoints[-keep:]
    keep_paths = {c.path for c in kept}
    for c in checkpoints:
        if c.path not in keep_paths and Path(c.path).exists():
            shutil.rmtree(c.path, ignore_errors=True)
    return kept
