"""Generate the Python code of the rlhf.v1 contracts into services/rlhf/v1 (the import path rlhf.v1).

Usage: python protos/generate.py [OUT_DIR]   (default: services/rlhf/v1; the staleness test passes a temp dir)
"""

import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "rlhf" / "v1").glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((Path(tmp) / "rlhf" / "v1").iterdir()):
            shutil.copy(f, out_dir / f.name)
            written.append(out_dir / f.name)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "services" / "rlhf" / "v1"
    for path in generate(out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
