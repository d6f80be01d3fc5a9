"""Write files and folders atomically: a reader sees the old version or the new one, never half of one.

The one home of write-to-temp-then-rename. A temporary name sits beside its target (same folder, so the
rename stays on one filesystem and is atomic) and starts with a dot, so a folder listing skips it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def under_roots(path: str | os.PathLike, roots: list[str]) -> bool:
    """Whether ``path``, resolved (symlinks and ``..`` followed), lies under one of ``roots`` (empty: anywhere).

    The one check of every path a client may name (LoadModel's folder, UpdateWeights' file and each shard)."""
    if not roots:
        return True
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def _temporary_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (before a rename publishes it)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target`` (a file).

    The caller writes the whole file to the yielded path (``save_file(state, str(tmp))``); on an
    exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    tmp = _temporary_sibling(target)
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` to ``target`` atomically (with ``fsync`` the bytes are on disk before the rename)."""
    target = Path(target)
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return target


@contextmanager
def atomic_folder(target: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target`` whole.

    For checkpoints and model folders (``save_pretrained(tmp)``): a reader never sees a half-written
    folder under the final name. On an exception the temporary folder is removed.
    """
    target = Path(target)
    tmp = _temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
