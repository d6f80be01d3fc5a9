"""``python -m rlhf.bench {all|NAME ...} --out DIR``: run benchmarks one after another, write results to DIR."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# name -> module exposing run(out_dir: Path) -> dict. `all` runs them in this order.
BENCHMARKS = {
    "feedback": "rlhf.bench.feedback",
    "generation": "rlhf.bench.generation",
    "reward": "rlhf.bench.reward",
    "labeling": "rlhf.bench.labeling",
    "rl": "rlhf.bench.rl",
    "train": "rlhf.bench.training",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.bench", description=__doc__)
    parser.add_argument("names", nargs="+", help=f"'all' or some of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", default="bench-results", type=Path, help="Folder for the result files.")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in names:
        print(f"== benchmark {name}", flush=True)
        try:
            module = importlib.import_module(BENCHMARKS[name])
        except ModuleNotFoundError as exc:
            print(f"   {name}: not available ({exc})")
            failed.append(name)
            continue
        result = module.run(args.out)
        print(json.dumps(result, indent=2, default=str)[:4000], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
