"""`make bench-rl`: one PPO iteration through the services vs TRL's in-process trainers, side by side in one run.

Settings shared by all three (the issue's): SmolLM2-135M-Instruct fp32, 16 rollouts per iteration of at most 48 new
tokens, temperature 0.7, 2 torch threads. Baselines run in their own virtual environments that this module creates
(never dependencies of the platform):
- TRL 1.16 GRPOTrainer: 4 prompts x 4 generations, no reference model (beta=0), reward from a 135M reward model;
- TRL 0.11.4 PPOv2Trainer (the last release with a PPO trainer): policy, reference, reward and value models from the
  same checkpoint, 1 PPO epoch, 1 minibatch.
Each trainer runs ``iterations`` steps; the first is warm-up and is excluded from the median.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf.bench.ppo_iteration import time_ppo_iterations
from rlhf.bench.results import machine_info, write_result
from rlhf.core.models import init_reward_model_from_causal_lm, load_tokenizer, resolve_model_path
from rlhf.demo.task import load_prompts

BASELINE_DIR = Path(__file__).parent / "baselines"
VENV_ROOT = Path(os.environ.get("RLHF_BENCH_VENVS", Path.home() / ".cache" / "rlhf" / "bench-venvs"))
ROLLOUTS = 16
MAX_NEW_TOKENS = 48
TEMPERATURE = 0.7
THREADS = 2

# Each baseline's venv: its pinned packages (torch is always the CPU 2.13.0 build installed first).
VENVS = {
    "trl-1.16": ["trl==1.16.0"],
    "trl-0.11.4": ["trl==0.11.4", "transformers==4.46.3", "accelerate==1.0.1", "datasets<3.2", "rich"],
}
# result key -> (venv, script, the script's flag for the number of iterations)
BASELINES = {
    "trl_grpo": ("trl-1.16", "trl_grpo.py", "--steps"),
    "trl_ppov2": ("trl-0.11.4", "trl_ppov2.py", "--iterations"),
}


def ensure_venv(name: str) -> Path:
    """Create (once) the venv ``name`` with its pinned packages; return its python."""
    venv = VENV_ROOT / name
    python = venv / "bin" / "python"
    stamp = venv / ".rlhf-bench-ready"
    wanted = json.dumps(VENVS[name])
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *VENVS[name]], check=True)
    stamp.write_text(wanted)
    return python


def _median_steady(step_seconds: list[float]) -> float:
    steady = step_seconds[1:] if len(step_seconds) > 1 else step_seconds
    return statistics.median(steady)


def run_baseline(name: str, script: str, args: list[str], workdir: Path) -> dict:
    python = ensure_venv(name)
    out = workdir / f"{Path(script).stem}.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(THREADS),
        "OMP_WAIT_POLICY": "PASSIVE",  # the same thread setting as ours (rlhf.bench.ppo_iteration.THREAD_ENV)
        "PYTHONPATH": "",
    }
    log = workdir / f"{Path(script).stem}.log"
    with open(log, "w") as logf:
        positional, options = args[:3], args[3:]
        proc = subprocess.run(
            [str(python), str(BASELINE_DIR / script), *positional, str(out), *options],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed ({proc.returncode}); log {log}:\n" + log.read_text()[-3000:])
    result = json.loads(out.read_text())
    seconds = _median_steady(result["step_seconds"])
    result["seconds_per_iteration"] = seconds
    result["rollouts_per_second"] = result["rollouts_per_step"] / seconds
    return result


def prepare_models(workdir: Path) -> tuple[Path, Path, Path]:
    """(policy folder, 135M reward-model folder, prompts.json) shared by every contender."""
    model_dir = resolve_model_path("smollm2-135m-instruct")
    rm_dir = workdir / "reward-model"
    if not (rm_dir / "config.json").exists():
        rm, _ = init_reward_model_from_causal_lm(model_dir)
        rm.save_pretrained(rm_dir)
        load_tokenizer(model_dir).save_pretrained(rm_dir)
    prompts = [p["prompt"] for p in load_prompts("train")][:256]
    prompts_json = workdir / "prompts.json"
    prompts_json.write_text(json.dumps(prompts))
    return model_dir, rm_dir, prompts_json


def run_ours(model_dir: Path, rm_dir: Path, prompts_json: Path, iterations: int, workdir: Path) -> dict:
    return time_ppo_iterations(
        model_dir=model_dir,
        reward_model_dir=rm_dir,
        prompts=json.loads(prompts_json.read_text()),
        iterations=iterations,
        rollouts=ROLLOUTS,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        workdir=workdir,
    )


def markdown_table(result: dict) -> str:
    rows = ["| trainer | s / iteration | rollouts / s | ours vs it |", "| --- | ---: | ---: | ---: |"]
    ours = result.get("ours")
    for key, label in (
        ("ours", "rlhf PPO (services)"),
        ("trl_grpo", "TRL 1.16 GRPOTrainer"),
        ("trl_ppov2", "TRL 0.11.4 PPOv2Trainer"),
    ):
        r = result.get(key)
        if not r:
            continue
        ratio = (
            ""
            if key == "ours" or not ours
            else f"{ours['rollouts_per_second'] / r['rollouts_per_second']:.2f}x"
        )
        rows.append(
            f"| {label} | {r['seconds_per_iteration']:.2f} | {r['rollouts_per_second']:.3f} | {ratio} |"
        )
    lines = [
        f"Settings: {ROLLOUTS} rollouts/iteration, <= {MAX_NEW_TOKENS} new tokens, temperature {TEMPERATURE}, "
        f"SmolLM2-135M-Instruct fp32, {THREADS} threads; median over iterations after the first.",
        "",
        *rows,
    ]
    if ours and ours.get("phase_seconds"):
        lines += [
            "",
            "Our time per phase (median seconds per iteration):",
            "",
            "| phase | seconds |",
            "| --- | ---: |",
        ]
        lines += [f"| {k} | {v:.2f} |" for k, v in ours["phase_seconds"].items()]
    m = result.get("machine_summary")
    if m:
        lines += ["", f"Machine: {m}"]
    return "\n".join(lines) + "\n"


def run(
    out_dir: Path, iterations: int = 4, which: tuple[str, ...] = ("ours", "trl_grpo", "trl_ppov2")
) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-bench-rl-"))
    model_dir, rm_dir, prompts_json = prepare_models(workdir)
    common = [str(model_dir), str(rm_dir), str(prompts_json)]
    result: dict = {
        "settings": {
            "rollouts": ROLLOUTS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE,
            "threads": THREADS,
            "iterations": iterations,
        }
    }
    if "ours" in which:
        result["ours"] = run_ours(model_dir, rm_dir, prompts_json, iterations, workdir)
    for key, (venv, script, iterations_flag) in BASELINES.items():
        if key in which:
            args = [*common, iterations_flag, str(iterations), "--threads", str(THREADS)]
            result[key] = run_baseline(venv, script, args, workdir)
    ours = result.get("ours")
    if ours:
        for key in ("trl_grpo", "trl_ppov2"):
            if result.get(key):
                result[f"ratio_vs_{key}"] = ours["rollouts_per_second"] / result[key]["rollouts_per_second"]
    info = machine_info()
    result["machine_summary"] = (
        f"{info.get('cpu_model', '?')}, {info.get('cpu_count')} cores, {info.get('mem_gib')} GiB"
    )
    write_result(out_dir, "rl", result, markdown=markdown_table(result))
    return result
