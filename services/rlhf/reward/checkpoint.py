"""The reward-model checkpoint format shared by the RM trainer (writer) and the reward service (reader).

A checkpoint is a Hugging Face folder written by ``save_pretrained`` (an ``AutoModelForSequenceClassification``
with ``num_labels=1``: safetensors weights + ``config.json``), the tokenizer files, and ``rlhf_reward.json``::

    {"format": 1, "version": "rm-final-3f2a9c1d", "reward_mean": 0.12, "reward_std": 1.7,
     "base_model": "...", "eval_accuracy": 0.71, ...}

``reward_mean`` / ``reward_std`` are the statistics of the raw scores seen in training; the service returns
``(score - reward_mean) / reward_std`` as the normalized score when ``reward_std > 0``. ``version`` is the name
the service reports for the model (default: the folder name plus a short hash of the weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from rlhf.core.files import atomic_write_text

METADATA_FILE = "rlhf_reward.json"
FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_hash(folder: str | os.PathLike, length: int = 8) -> str:
    """A short sha256 over the weight files and config of a model folder (stable across copies)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if (folder / "config.json").exists():
        files.append(folder / "config.json")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:length]


def default_version(folder: str | os.PathLike) -> str:
    folder = Path(folder)
    return f"{folder.resolve().name}-{weights_hash(folder)}"


def _finite(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def save_reward_checkpoint(
    model,
    tokenizer,
    folder: str | os.PathLike,
    *,
    reward_mean: float,
    reward_std: float,
    version: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` (one-label sequence classifier), ``tokenizer`` and the metadata file to ``folder``.

    ``extra`` is merged into the metadata (e.g. ``base_model``, ``eval_accuracy``, ``step``); it may not
    override ``reward_mean``, ``reward_std``, ``version`` or ``format``. Returns the folder.
    """
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels != 1:
        raise ValueError(f"a reward model has exactly one label, this model has {num_labels}")
    reward_mean = _finite("reward_mean", reward_mean)
    reward_std = _finite("reward_std", reward_std)
    if reward_std < 0:
        raise ValueError(f"reward_std must be >= 0, got {reward_std}")
    extra = dict(extra or {})
    reserved = {"format", "reward_mean", "reward_std", "version"} & set(extra)
    if reserved:
        raise ValueError(f"extra may not set {sorted(reserved)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    metadata = {
        "format": FORMAT_VERSION,
        "version": version or default_version(folder),
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        **extra,
    }
    atomic_write_text(
        folder / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n"
    )
    return folder


def read_reward_metadata(folder: str | os.PathLike) -> dict:
    """The metadata of a reward checkpoint, always with ``version``, ``reward_mean`` and ``reward_std``.

    A plain HF sequence-classification folder without ``rlhf_reward.json`` is accepted: its version is the
    folder name plus a weights hash and mean/std are ``None`` (no normalized scores). Raises
    ``FileNotFoundError`` when ``folder`` is not a model folder and ``ValueError`` on a malformed file.
    """
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a reward checkpoint (no config.json)")
    path = folder / METADATA_FILE
    metadata: dict = {}
    if path.exists():
        try:
            metadata = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: expected a JSON object")
    for key in ("reward_mean", "reward_std"):
        value = metadata.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{path}: {key} must be a finite number, got {value!r}")
            metadata[key] = float(value)
        else:
            metadata[key] = None
    if metadata["reward_std"] is not None and metadata["reward_std"] < 0:
        raise ValueError(f"{path}: reward_std must be >= 0")
    version = metadata.get("version")
    if version is not None and not isinstance(version, str):
        version = str(version)
    metadata["version"] = version or default_version(folder)
    return metadata
