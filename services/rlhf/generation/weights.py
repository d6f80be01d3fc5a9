"""Weight updates: read a safetensors payload (streamed bytes or a path), check it against the served model.

Checks, all before anything is swapped (a rejected update leaves the old weights serving):
- the SHA-256 of the streamed bytes equals the announced one (and the byte count matches);
- every tensor name is a parameter of the served model; without ``partial`` every parameter is present (tied
  parameters, e.g. ``lm_head.weight`` tied to ``model.embed_tokens.weight``, count as present when one of their
  names is sent);
- shapes and dtypes equal the served ones exactly (no silent casts);
- every value is finite (a NaN pushed by a diverged trainer would poison every later rollout).

The fast path on one host is ``checkpoint_path`` on a RAM-backed filesystem such as /dev/shm: the server maps
the file and copies it straight into the model; the SHA-256 is then optional (checked when given).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from rlhf.core.errors import InvalidArgument
from rlhf.core.files import under_roots


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class ModelSpec:
    """Names, shapes and dtypes of the served model's state dict, and which names share storage (tied)."""

    params: dict[str, ParamSpec]
    aliases: dict[str, tuple[str, ...]]  # name -> every name sharing its storage (itself included)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSpec:
        state = model.state_dict()
        by_storage: dict[tuple[int, int], list[str]] = {}
        for name, t in state.items():
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), []).append(name)
        aliases = {name: tuple(group) for group in by_storage.values() for name in group}
        params = {name: ParamSpec(tuple(t.shape), t.dtype) for name, t in state.items()}
        return cls(params, aliases)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def verify_tensors(tensors: dict[str, torch.Tensor], spec: ModelSpec, *, partial: bool) -> None:
    """Raise InvalidArgument naming the first tensor that does not fit the served model."""
    if not tensors:
        raise InvalidArgument("weights", "the update holds no tensors")
    for name, t in tensors.items():
        expected = spec.params.get(name)
        if expected is None:
            raise InvalidArgument(f"weights[{name!r}]", "not a parameter of the served model")
        if tuple(t.shape) != expected.shape:
            raise InvalidArgument(
                f"weights[{name!r}]", f"shape {list(t.shape)} != served shape {list(expected.shape)}"
            )
        if t.dtype != expected.dtype:
            raise InvalidArgument(
                f"weights[{name!r}]",
                f"dtype {_dtype_name(t.dtype)} != served dtype {_dtype_name(expected.dtype)}",
            )
    if not partial:
        missing = [n for n in spec.params if not any(a in tensors for a in spec.aliases.get(n, (n,)))]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise InvalidArgument(
                "weights",
                f"missing {', '.join(missing[:3])}{more} (send every parameter, or set metadata.partial)",
            )
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"weights[{name!r}]", "holds NaN or infinite values")


def tensors_from_bytes(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    try:
        return load(bytes(data))
    except Exception as exc:
        raise InvalidArgument("chunk", f"not a safetensors file: {exc}") from None


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted({path / f for f in weight_map.values()})
        for shard in shards:  # an index names files of its own folder, never ../ or an absolute path
            if not shard.resolve().is_relative_to(path.resolve()):
                raise InvalidArgument(
                    "metadata.checkpoint_path", f"{index}: shard {shard.name!r} is outside {path}"
                )
        return shards
    if (path / "model.safetensors").exists():
        # an HF folder: its weights are model.safetensors, as from_pretrained reads them; other files beside it
        # (e.g. the value head a PPO checkpoint carries) are not the model's
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidArgument("metadata.checkpoint_path", f"{path}: no .safetensors file in the folder")
    return files


def tensors_from_path(
    path_text: str, expected_sha256: str = "", roots: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or an HF folder (single file or sharded with an index).

    With ``roots``, the path and every file read must lie under one of them (INVALID_ARGUMENT naming the
    file otherwise, as the reward service's LoadModel answers outside its model_roots)."""
    path = Path(path_text).expanduser()
    if not under_roots(path, roots or []):
        raise InvalidArgument(
            "metadata.checkpoint_path", f"{path} is outside the allowed weight_roots {roots}"
        )
    if not path.exists():
        raise InvalidArgument("metadata.checkpoint_path", f"{path}: no such file or folder")
    files = _safetensors_files(path)
    outside = [f for f in files if not under_roots(f, roots or [])]
    if outside:
        raise InvalidArgument(
            "metadata.checkpoint_path", f"{outside[0]} is outside the allowed weight_roots {roots}"
        )
    if expected_sha256:
        if len(files) != 1:
            raise InvalidArgument(
                "metadata.sha256", "a checksum is only checked for a single-file checkpoint"
            )
        if file_sha256(files[0]) != expected_sha256.lower():
            raise InvalidArgument("metadata.sha256", f"does not match the SHA-256 of {files[0]}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                for name in reader.keys():
                    tensors[name] = reader.get_tensor(name)
        except InvalidArgument:
            raise
        except Exception as exc:
            raise InvalidArgument(
                "metadata.checkpoint_path", f"{f}: not a readable safetensors file: {exc}"
            ) from None
    return tensors


def file_sha256(path: str | os.PathLike, block: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses tensors sharing memory), contiguous, on CPU."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def serialize_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    return save(unique_tensors(state_dict))


def chunked(data: bytes, size: int) -> Iterable[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])
