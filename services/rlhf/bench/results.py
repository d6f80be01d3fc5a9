"""What every benchmark result carries: the machine's details beside the figures (``<name>.json``, ``<name>.md``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def machine_info() -> dict:
    """The details a benchmark result must carry to be comparable."""
    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(ln.split()[1])
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        )
        info["mem_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return info


def write_result(out_dir: Path, name: str, result: dict, markdown: str | None = None) -> Path:
    """Write ``<name>.json`` (result + machine details) and optionally ``<name>.md`` into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **result}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    if markdown is not None:
        (out_dir / f"{name}.md").write_text(markdown)
    return path
