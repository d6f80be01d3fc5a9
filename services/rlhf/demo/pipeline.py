"""The demo's flow, stage by stage, every step through the services' gRPC APIs.

    start services   feedback store (SQLite), policy generation (base model), reward scoring (empty)
    demonstrations   k base-model samples per prompt; the simulated demonstrator keeps the gold-best -> store;
                     every pair of the k samples also goes to the Bradley-Terry comparers -> store
    sft              snapshot of the demonstrations -> rlhf.trainer.sft.run_sft -> HF folder
    comparisons      the SFT model is loaded into the generation service; k samples per prompt, every pair
                     compared by the Bradley-Terry labelers; samples of other prompts rated 1-7 -> store
    reward model     snapshot (split by prompt) -> rlhf.trainer.reward_model.run_reward_model (top layers and
                     head trained from cached features of the frozen lower layers) -> LoadModel into the
                     reward service
    ppo              rlhf.trainer.ppo.run_ppo against the generation and reward services, KL to the SFT model
    evaluation       base, SFT and PPO answer the held-out prompts through the generation service; gold score,
                     win rate, KL(PPO || SFT), distinct-n, lengths, RM accuracy vs the labelers' Bayes optimum
    report           report.md + PNG plots in the run folder

The labelers are simulated (rlhf.demo.labelers) but write through the same feedback-store API a labeling tool
for people would use; the trainers only ever see the store's snapshots, never the gold score.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rlhf.demo import evaluate as ev
from rlhf.demo.labelers import (
    Candidate,
    collect_comparisons,
    collect_demonstrations,
    collect_ratings,
    default_pool,
    register_labelers,
    scored_pair_accuracy,
)
from rlhf.demo.task import gold_score, load_prompts, sample_finished

log = logging.getLogger("rlhf.demo")


@dataclass(frozen=True)
class Preset:
    """The sizes of one demo run. Times in ``stage_estimates`` (seconds) only drive the ETA display."""

    name: str
    model: str  # "default" (SmolLM2) or "tiny" (a tiny random Llama built into the run folder)
    max_new_tokens: int
    temperature: float  # sampling temperature of PPO rollouts and of the evaluation samples
    # demonstrations: best of k base samples, at temperature demo_temperature
    demo_prompts: int
    demo_k: int
    demo_temperature: float
    # SFT
    sft_epochs: float
    sft_learning_rate: float
    sft_batch_size: int
    # feedback: every pair of the demonstration stage's k base samples is compared too (base_comparisons);
    # comparison_samples SFT samples per comparison prompt, every pair of them compared
    base_comparisons: bool
    comparison_prompts: int
    comparison_samples: int
    comparison_labelers: int  # different comparers who judge each pair (one record each)
    rating_prompts: int
    # reward model: the top rm_trainable_layers layers and the head (0 = the whole model)
    rm_epochs: float
    rm_learning_rate: float
    rm_head_learning_rate: float
    rm_batch_size: int
    rm_trainable_layers: int
    rm_group_by_prompt: bool  # all pairs of a prompt in one batch: one forward per reply, not per pair
    # PPO
    ppo_iterations: int
    ppo_rollouts: int
    ppo_learning_rate: float
    ppo_kl_coef: float
    # per-response KL (nats) the adaptive controller steers kl_coef to; None = a fixed kl_coef. The presets fix
    # it: with its usual horizon (10,000 rollouts) the controller moves the coefficient by < 1% in a run of a
    # few hundred rollouts, so "adaptive" would only be a claim
    ppo_target_kl: float | None
    ppo_advantage: str  # "rloo" (baseline: the other samples of the prompt) or "gae" (value head)
    ppo_samples_per_prompt: int
    ppo_epochs: int
    ppo_mini_batches: int
    # evaluation
    eval_prompts: int  # 0 = every eval prompt
    eval_samples: int  # per eval prompt and policy; the win rate meets every PPO with every SFT sample
    generation_batch: int  # sequences in flight to the generation service (it batches them)
    max_length: int
    stage_estimates: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(
        name="default",
        model="default",
        max_new_tokens=48,
        temperature=0.7,
        demo_prompts=128,
        demo_k=4,
        demo_temperature=0.8,
        sft_epochs=2.0,
        sft_learning_rate=2e-5,
        sft_batch_size=8,
        base_comparisons=True,
        comparison_prompts=100,
        comparison_samples=4,
        comparison_labelers=3,
        rating_prompts=48,
        rm_epochs=1.0,
        rm_learning_rate=2e-4,
        rm_head_learning_rate=2e-3,
        rm_batch_size=32,
        rm_trainable_layers=2,
        rm_group_by_prompt=True,
        ppo_iterations=20,
        ppo_rollouts=16,
        ppo_learning_rate=2e-5,
        ppo_kl_coef=0.1,
        ppo_target_kl=None,
        ppo_advantage="rloo",
        ppo_samples_per_prompt=4,
        ppo_epochs=2,
        ppo_mini_batches=2,
        eval_prompts=0,
        eval_samples=2,
        generation_batch=64,
        max_length=256,
        stage_estimates={
            "services": 5,
            "demonstrations": 130,
            "sft": 145,
            "comparisons": 125,
            "reward_model": 150,
            "ppo": 575,
            "evaluation": 215,
            "report": 5,
        },
    ),
    "quick": Preset(
        name="quick",
        model="default",
        max_new_tokens=24,
        temperature=0.7,
        demo_prompts=16,
        demo_k=2,
        demo_temperature=0.8,
        sft_epochs=1.0,
        sft_learning_rate=2e-5,
        sft_batch_size=8,
        base_comparisons=True,
        comparison_prompts=16,
        comparison_samples=3,
        comparison_labelers=1,
        rating_prompts=4,
        rm_epochs=1.0,
        rm_learning_rate=5e-5,
        rm_head_learning_rate=5e-4,
        rm_batch_size=16,
        rm_trainable_layers=2,
        rm_group_by_prompt=True,
        ppo_iterations=3,
        ppo_rollouts=4,
        ppo_learning_rate=1e-5,
        ppo_kl_coef=0.05,
        ppo_target_kl=None,
        ppo_advantage="rloo",
        ppo_samples_per_prompt=2,
        ppo_epochs=1,
        ppo_mini_batches=1,
        eval_prompts=12,
        eval_samples=1,
        generation_batch=64,
        max_length=160,
        stage_estimates={
            "services": 15,
            "demonstrations": 10,
            "sft": 15,
            "comparisons": 15,
            "reward_model": 40,
            "ppo": 30,
            "evaluation": 20,
            "report": 5,
        },
    ),
    "tiny": Preset(
        name="tiny",
        model="tiny",
        max_new_tokens=12,
        temperature=1.0,
        demo_prompts=24,
        demo_k=2,
        demo_temperature=1.0,
        sft_epochs=1.0,
        sft_learning_rate=1e-3,
        sft_batch_size=8,
        base_comparisons=True,
        comparison_prompts=24,
        comparison_samples=3,
        comparison_labelers=2,
        rating_prompts=8,
        rm_epochs=1.0,
        rm_learning_rate=1e-3,
        rm_head_learning_rate=1e-2,
        rm_batch_size=16,
        rm_trainable_layers=1,
        rm_group_by_prompt=True,
        ppo_iterations=2,
        ppo_rollouts=8,
        ppo_learning_rate=1e-4,
        ppo_kl_coef=0.05,
        ppo_target_kl=None,
        ppo_advantage="rloo",
        ppo_samples_per_prompt=2,
        ppo_epochs=1,
        ppo_mini_batches=1,
        eval_prompts=16,
        eval_samples=2,
        generation_batch=32,
        max_length=128,
        stage_estimates={
            "services": 8,
            "demonstrations": 3,
            "sft": 5,
            "comparisons": 3,
            "reward_model": 5,
            "ppo": 15,
            "evaluation": 5,
            "report": 3,
        },
    ),
}

STAGES = ("services", "demonstrations", "sft", "comparisons", "reward_model", "ppo", "evaluation", "report")


# ---- progress -----------------------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class StageClock:
    """Prints ``[3/8] sft ...`` lines with the elapsed time and an ETA: the preset's remaining estimates,
    scaled by how fast the finished stages ran compared with their estimates. The speed starts from a prior
    worth a tenth of the whole estimate at speed 1, so a short first stage (services: a few seconds) does not
    halve or double the ETA on its own."""

    def __init__(self, estimates: dict[str, float], enabled: bool = True, stream=None):
        self.estimates = {s: float(estimates.get(s, 1.0)) for s in STAGES}
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._t0 = 0.0

    def eta(self) -> float:
        prior = 0.1 * sum(self.estimates.values())
        done_est = sum(self.estimates[s] for s in self.seconds) + prior
        done_real = sum(self.seconds.values()) + prior
        speed = done_real / done_est if done_est > 0 else 1.0
        remaining = [s for s in STAGES if s not in self.seconds]
        return speed * sum(self.estimates[s] for s in remaining)

    def begin(self, stage: str, detail: str = "") -> None:
        self._current, self._t0 = stage, time.monotonic()
        if self.enabled:
            index = STAGES.index(stage) + 1
            elapsed = time.monotonic() - self.start
            print(
                f"[{index}/{len(STAGES)}] {stage}{(': ' + detail) if detail else ''}  "
                f"(elapsed {_clock(elapsed)}, ETA {_clock(self.eta())} left)",
                file=self.stream,
                flush=True,
            )

    @property
    def current(self) -> str | None:
        """The stage under way (None between stages)."""
        return self._current

    def end(self) -> float:
        seconds = time.monotonic() - self._t0
        if self._current is not None:
            self.seconds[self._current] = seconds
        self._current = None
        return seconds


def _bar(total: int, desc: str, enabled: bool, unit: str = "samples"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


# ---- talking to the services --------------------------------------------------------------------------------


@dataclass
class Generated:
    prompt: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool


def generate(
    policy,
    prompts: Sequence[str],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch: int,
    desc: str,
    progress: bool,
) -> list[list[Generated]]:
    """``n`` samples per prompt from the generation service.

    One request per prompt, up to ``batch`` sequences (``batch // n`` requests) in flight (asynchronous gRPC
    calls; the service batches concurrent requests into shared forward passes: on a CPU 64 sequences per decode
    step give 1.5x the samples per second of 16). Each prompt has its own seed (``seed`` + its index): the
    service seeds a sample from (request seed, sample index), so prompts sharing one request would share their
    random draws. On any error or Ctrl-C the calls still in flight are cancelled.
    """
    from collections import deque

    from rlhf.generation.client import make_params, make_prompt
    from rlhf.v1 import policy_pb2

    def request(index: int):
        message = policy_pb2.GenerateRequest(
            prompts=[make_prompt(prompts[index])],
            params=make_params(
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 100_003 + index, n=n
            ),
        )
        return policy.stub.Generate.future(message, timeout=policy.timeout)

    out: list[list[Generated]] = []
    in_flight: deque = deque()
    next_index = 0
    with _bar(len(prompts) * n, desc, progress) as bar:
        try:
            while len(out) < len(prompts):
                while next_index < len(prompts) and len(in_flight) < max(1, batch // n):
                    in_flight.append(request(next_index))
                    next_index += 1
                response = in_flight.popleft().result()
                index = len(out)
                out.append(
                    [
                        Generated(
                            prompt=prompts[index],
                            # the store and the reward service refuse NUL characters (a tiny random
                            # model can sample one); a reader would not see it either
                            text=s.text.replace("\x00", ""),
                            token_ids=list(s.token_ids),
                            logprobs=list(s.logprobs),
                            finished=sample_finished(s),
                        )
                        for s in response.samples
                    ]
                )
                bar.update(len(response.samples))
        finally:
            for future in in_flight:
                future.cancel()
    return out


def _candidate(g: Generated, version: str) -> Candidate:
    return Candidate(text=g.text, finished=g.finished, model_version=version)


def all_pairs(groups: Sequence[tuple[str, Sequence[Candidate]]]) -> list[tuple[str, Candidate, Candidate]]:
    """Every pair of distinct, non-empty candidates of each prompt, as (prompt, a, b) to compare."""
    from itertools import combinations

    items = []
    for prompt, candidates in groups:
        unique = list({c.text: c for c in candidates if c.text.strip()}.values())
        items += [(prompt, a, b) for a, b in combinations(unique, 2)]
    return items


# ---- the run ------------------------------------------------------------------------------------------------


@dataclass
class DemoOutcome:
    run_dir: Path
    report: Path
    results_path: Path
    checkpoints: dict[str, str]
    results: dict

    def summary_text(self) -> str:
        lines = ["", "RLHF demo finished.", ""]
        for t in self.results.get("targets", []):
            lines.append(
                f"  {'ok ' if t['met'] else 'MISS'} {t['name']}: {t['reached']} (target {t['wanted']})"
            )
        lines += ["", "Checkpoints (Hugging Face folders):"]
        lines += [f"  {name:<13} {path}" for name, path in self.checkpoints.items()]
        lines += ["", f"Report:  {self.report}", f"Results: {self.results_path}", ""]
        return "\n".join(lines)


def _threads_env(threads: int) -> dict[str, str]:
    return {
        "RLHF_TORCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def resolve_preset(cfg) -> Preset:
    preset = PRESETS[cfg.preset]
    names = (
        "ppo_iterations",
        "ppo_rollouts",
        "demo_prompts",
        "comparison_prompts",
        "rating_prompts",
        "eval_prompts",
        "eval_samples",
    )
    overrides = {name: getattr(cfg, name) for name in names if getattr(cfg, name, 0)}
    if not overrides:
        return preset
    resolved = replace(preset, **overrides)
    # the ETA: a stage's estimate grows with the size that drives it (eval_prompts 0 means all of them)
    estimates = dict(preset.stage_estimates)
    drivers = {"ppo": ("ppo_iterations", "ppo_rollouts"), "demonstrations": ("demo_prompts",)}
    drivers["sft"] = drivers["demonstrations"]
    drivers["comparisons"] = drivers["reward_model"] = ("comparison_prompts",)
    drivers["evaluation"] = ("eval_samples",)
    for stage, fields in drivers.items():
        for name in fields:
            before, after = getattr(preset, name), getattr(resolved, name)
            if stage in estimates and before and after != before:
                estimates[stage] *= after / before
    return replace(resolved, stage_estimates=estimates)


def command_line(cfg) -> str:
    """The ``rlhf demo`` command that reproduces ``cfg`` (run folder and progress left out)."""
    parts = ["rlhf", "demo", "--preset", cfg.preset, "--seed", str(cfg.seed)]
    for name, field_info in type(cfg).model_fields.items():
        if name in ("preset", "seed", "run_dir", "progress"):
            continue
        value = getattr(cfg, name)
        if value != field_info.default:
            parts += ["--" + name.replace("_", "-"), str(value)]
    return " ".join(parts)


def base_model_path(cfg, preset: Preset, run_dir: Path) -> Path:
    from rlhf.core.models import make_tiny_causal_lm, resolve_model_path

    if cfg.model:
        return resolve_model_path(cfg.model)
    if preset.model == "tiny":
        folder = run_dir / "models" / "base"
        if not (folder / "config.json").exists():
            make_tiny_causal_lm(folder, seed=cfg.seed)
        return folder
    return resolve_model_path("default")


class DemoInterrupted(Exception):
    """The demo stopped before its report: Ctrl-C, SIGTERM or a trainer job's Stop. Raised after the services
    were stopped; ``exit_code`` is 128 + the signal number (as a killed process would have) or the stopped
    job's exit code."""

    def __init__(self, run_dir: Path, stage: str | None, reason: str, exit_code: int):
        super().__init__(f"the demo stopped during the {stage or 'setup'} stage ({reason})")
        self.run_dir, self.stage, self.reason, self.exit_code = run_dir, stage, reason, exit_code


def run_demo(cfg) -> DemoOutcome:
    """Run the whole demo described by ``cfg`` (a DemoConfig); returns where everything was written.
    Raises :class:`DemoInterrupted` (after stopping the services) when it is stopped before the end."""
    import signal

    from rlhf.core.launcher import Interrupted
    from rlhf.trainer.job import JobStopped

    preset = resolve_preset(cfg)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run_dir or Path("runs") / f"demo-{stamp}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = StageClock(preset.stage_estimates, enabled=cfg.progress)
    try:
        return _run_stages(cfg, preset, run_dir, clock, stamp)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        raise DemoInterrupted(run_dir, clock.current, name, 128 + signum) from exc
    except JobStopped as exc:
        raise DemoInterrupted(run_dir, clock.current, f"trainer job stopped: {exc}", exc.exit_code) from exc


def _run_stages(cfg, preset: Preset, run_dir: Path, clock: StageClock, stamp: str) -> DemoOutcome:
    from rlhf.core.launcher import Launcher
    from rlhf.core.models import set_torch_threads

    set_torch_threads(cfg.torch_threads)
    os.environ.update({k: v for k, v in _threads_env(cfg.torch_threads).items() if k != "RLHF_TORCH_THREADS"})
    progress = cfg.progress
    rng = random.Random(cfg.seed)
    pool = default_pool(seed=cfg.seed)
    results: dict = {
        "title": f"RLHF demo ({preset.name} preset)",
        "command": command_line(cfg),
        "preset": preset.name,
        "preset_settings": {k: v for k, v in asdict(preset).items() if k != "stage_estimates"},
        "started_at": stamp,
    }
    checkpoints: dict[str, str] = {}

    train_prompts = [p["prompt"] for p in load_prompts("train")]
    eval_prompts = [p["prompt"] for p in load_prompts("eval")]
    if preset.eval_prompts:
        eval_prompts = eval_prompts[: preset.eval_prompts]
    shuffled = train_prompts[:]
    random.Random(cfg.seed).shuffle(shuffled)

    def take(start: int, count: int) -> list[str]:
        # wrap around the train prompts when a preset asks for more than there are
        return [shuffled[(start + i) % len(shuffled)] for i in range(count)]

    demo_prompts = take(0, preset.demo_prompts)
    comparison_prompts = take(preset.demo_prompts, preset.comparison_prompts)
    rating_prompts = take(preset.demo_prompts + preset.comparison_prompts, preset.rating_prompts)

    with Launcher(run_dir / "services", env=_threads_env(cfg.torch_threads)) as launcher:
        # ---- 1. services ------------------------------------------------------------------------------------
        clock.begin("services", "feedback store, generation, reward")
        base = base_model_path(cfg, preset, run_dir)
        checkpoints["base"] = str(base)
        common = ["--torch-threads", str(cfg.torch_threads), "--log-level", "WARNING"]
        from concurrent.futures import ThreadPoolExecutor

        specs = {
            "feedback": ["--database-url", f"sqlite:///{run_dir / 'feedback.db'}", *common],
            "generation": [
                "--model",
                str(base),
                "--max-batch-size",
                str(max(16, preset.generation_batch)),
                "--max-new-tokens-limit",
                str(max(64, preset.max_new_tokens)),
                *common,
            ],
            "reward": [*common],
        }
        # started side by side: each spends its first seconds importing torch and loading a model
        with ThreadPoolExecutor(max_workers=len(specs)) as starter:
            futures = {
                name: starter.submit(launcher.start, name, ["serve", name], args=args)
                for name, args in specs.items()
            }
            started = {name: f.result() for name, f in futures.items()}
        feedback, generation, reward = started["feedback"], started["generation"], started["reward"]
        results["services"] = {name: s.target for name, s in launcher.services.items()}
        clock.end()

        from rlhf.feedback.client import FeedbackClient
        from rlhf.feedback.records import make_prompt
        from rlhf.generation.client import PolicyClient
        from rlhf.reward.client import RewardClient
        from rlhf.v1 import feedback_pb2

        with (
            FeedbackClient(feedback.target) as store,
            PolicyClient(generation.target, timeout=600) as policy,
            RewardClient(reward.target, timeout=600) as rm_client,
        ):
            register_labelers(store, pool.all())
            store.add_prompts(
                [
                    feedback_pb2.PromptRecord(
                        idempotency_key=f"demo:prompt:{p}", prompt=make_prompt(p), source="demo-train"
                    )
                    for p in train_prompts
                ]
            )
            store.create_snapshot(
                f"demo-ppo-prompts-s{cfg.seed}", kinds=["prompt"], eval_fraction=0.0, seed=cfg.seed
            )

            # ---- 2. demonstrations ------------------------------------------------------------------------
            clock.begin(
                "demonstrations", f"best of {preset.demo_k} base samples for {len(demo_prompts)} prompts"
            )
            groups = generate(
                policy,
                demo_prompts,
                n=preset.demo_k,
                max_new_tokens=preset.max_new_tokens,
                temperature=preset.demo_temperature,
                seed=cfg.seed * 1000 + 1,
                batch=preset.generation_batch,
                desc="base samples",
                progress=progress,
            )
            collect_demonstrations(
                store,
                pool.demonstrator,
                [(g[0].prompt, [_candidate(x, "base") for x in g]) for g in groups],
                tag=f"s{cfg.seed}",
            )
            base_compared = []
            if preset.base_comparisons:
                # the k base samples per prompt are shown in pairs to the comparers as well: the reward model
                # learns from them together with the SFT samples below
                base_compared = collect_comparisons(
                    store,
                    pool.comparers,
                    all_pairs([(g[0].prompt, [_candidate(x, "base") for x in g]) for g in groups]),
                    tag=f"s{cfg.seed}-base",
                    rng=rng,
                    labelers_per_pair=preset.comparison_labelers,
                )
            store.create_snapshot(
                f"demo-sft-s{cfg.seed}", kinds=["demonstration"], eval_fraction=0.1, seed=cfg.seed
            )
            results["demonstrations"] = {
                "prompts": len(groups),
                "k": preset.demo_k,
                "base_gold_mean": ev.mean(
                    [gold_score(x.text, finished=x.finished) for g in groups for x in g]
                ),
                "demo_gold_mean": ev.mean(
                    [max(gold_score(x.text, finished=x.finished) for x in g) for g in groups]
                ),
            }
            clock.end()

            # ---- 3. SFT -----------------------------------------------------------------------------------
            clock.begin("sft", f"{preset.sft_epochs:g} epochs on {len(groups)} demonstrations")
            sft_path = train_sft(cfg, preset, base, feedback.target, run_dir, progress)
            checkpoints["SFT"] = str(sft_path)
            policy.update_weights(version=1, checkpoint_path=str(sft_path))
            clock.end()

            # ---- 4. comparisons and ratings on SFT samples ------------------------------------------------
            k = preset.comparison_samples
            clock.begin(
                "comparisons",
                f"{len(comparison_prompts)} prompts x {k * (k - 1) // 2} pairs of {k} SFT samples, "
                f"{preset.comparison_labelers} comparer(s) per pair, {len(rating_prompts)} rated",
            )
            pairs = generate(
                policy,
                comparison_prompts,
                n=k,
                max_new_tokens=preset.max_new_tokens,
                temperature=preset.temperature,
                seed=cfg.seed * 1000 + 2,
                batch=preset.generation_batch,
                desc="SFT samples to compare",
                progress=progress,
            )
            items = all_pairs([(g[0].prompt, [_candidate(x, "sft") for x in g]) for g in pairs])
            compared = collect_comparisons(
                store,
                pool.comparers,
                items,
                tag=f"s{cfg.seed}",
                rng=rng,
                labelers_per_pair=preset.comparison_labelers,
            )
            rated = generate(
                policy,
                rating_prompts,
                n=2,
                max_new_tokens=preset.max_new_tokens,
                temperature=preset.temperature,
                seed=cfg.seed * 1000 + 3,
                batch=preset.generation_batch,
                desc="SFT samples to rate",
                progress=progress,
            )
            ratings = collect_ratings(
                store,
                pool.raters,
                [(x.prompt, _candidate(x, "sft")) for g in rated for x in g],
                tag=f"s{cfg.seed}",
                rng=rng,
            )
            rm_snapshot = f"demo-rm-s{cfg.seed}"
            store.create_snapshot(
                rm_snapshot, kinds=["comparison", "rating"], eval_fraction=0.15, seed=cfg.seed
            )
            results["feedback"] = {
                "comparisons": len(compared) + len(base_compared),
                "sft_comparisons": len(compared),
                "base_comparisons": len(base_compared),
                "labelers_per_pair": preset.comparison_labelers,
                "ratings": len(ratings),
            }
            clock.end()

            # ---- 5. reward model --------------------------------------------------------------------------
            clock.begin(
                "reward_model",
                f"{preset.rm_epochs:g} epoch(s) from the SFT model"
                + (f", its top {preset.rm_trainable_layers} layers" if preset.rm_trainable_layers else ""),
            )
            rm_path = train_reward_model(
                cfg, preset, sft_path, feedback.target, rm_snapshot, run_dir, progress
            )
            checkpoints["reward model"] = str(rm_path)
            rm_client.load_model(str(rm_path))
            results["reward_model"] = reward_model_accuracy(store, rm_client, rm_snapshot, pool, rm_path)
            clock.end()

            # ---- 6. PPO -----------------------------------------------------------------------------------
            clock.begin(
                "ppo",
                f"{preset.ppo_iterations} iterations x {preset.ppo_rollouts} rollouts "
                f"({preset.ppo_samples_per_prompt} per prompt, {preset.ppo_advantage.upper()} advantages)",
            )
            ppo_path, metrics_path = train_ppo(
                cfg, preset, sft_path, generation.target, reward.target, feedback.target, run_dir, progress
            )
            checkpoints["PPO"] = str(ppo_path)
            results["metrics_path"] = str(metrics_path)
            clock.end()

            # ---- 7. evaluation ----------------------------------------------------------------------------
            clock.begin("evaluation", f"base, SFT and PPO on {len(eval_prompts)} held-out prompts")
            evaluation = evaluate_policies(
                cfg,
                preset,
                policy,
                rm_client,
                eval_prompts,
                {"base": base, "SFT": sft_path, "PPO": ppo_path},
                reference=sft_path,
                progress=progress,
            )
            results.update(evaluation)
            clock.end()

    # ---- 8. report --------------------------------------------------------------------------------------
    clock.begin("report", str(run_dir / "report.md"))
    from rlhf.demo.report import write_report

    results["checkpoints"] = checkpoints
    results["targets"] = targets(results)
    results["eval_prompts"] = eval_prompts
    clock.end()
    results["stage_seconds"] = dict(clock.seconds)
    results["total_seconds"] = time.monotonic() - clock.start
    report = write_report(run_dir, results)
    results_path = run_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=1, default=str))
    return DemoOutcome(run_dir, report, results_path, checkpoints, results)


# ---- stages that call the trainer jobs ----------------------------------------------------------------------


def _job_common(cfg, preset: Preset, feedback_target: str, progress: bool) -> dict:
    return dict(
        port=0,
        metrics_port=-1,
        host="127.0.0.1",
        feedback_target=feedback_target,
        seed=cfg.seed,
        torch_threads=cfg.torch_threads,
        device="cpu",
        max_length=preset.max_length,
        eval_every=0,
        checkpoint_every=0,
        keep_checkpoints=1,
        progress=progress,
        log_level="WARNING",
    )


def train_sft(cfg, preset: Preset, base: Path, feedback_target: str, run_dir: Path, progress: bool) -> Path:
    from rlhf.trainer.config import SFTConfig
    from rlhf.trainer.sft import run_sft

    sft_cfg = SFTConfig(
        **_job_common(cfg, preset, feedback_target, progress),
        run_dir=str(run_dir / "sft"),
        model=str(base),
        snapshot=f"demo-sft-s{cfg.seed}",
        epochs=preset.sft_epochs,
        learning_rate=preset.sft_learning_rate,
        batch_size=preset.sft_batch_size,
        micro_batch_size=preset.sft_batch_size,
        lr_scheduler="linear",
    )
    return Path(run_sft(sft_cfg))


def train_reward_model(
    cfg, preset: Preset, sft_path: Path, feedback_target: str, snapshot: str, run_dir: Path, progress: bool
) -> Path:
    from rlhf.trainer.config import RewardModelConfig
    from rlhf.trainer.reward_model import run_reward_model

    rm_cfg = RewardModelConfig(
        **_job_common(cfg, preset, feedback_target, progress),
        run_dir=str(run_dir / "reward_model"),
        model=str(sft_path),
        snapshot=snapshot,
        epochs=preset.rm_epochs,
        learning_rate=preset.rm_learning_rate,
        head_learning_rate=preset.rm_head_learning_rate,
        trainable_layers=preset.rm_trainable_layers,
        group_by_prompt=preset.rm_group_by_prompt,
        batch_size=preset.rm_batch_size,
        micro_batch_size=preset.rm_batch_size,
        eval_batch_size=32,
        version=f"demo-rm-s{cfg.seed}",
    )
    return Path(run_reward_model(rm_cfg))


def train_ppo(
    cfg,
    preset: Preset,
    sft_path: Path,
    generation_target: str,
    reward_target: str,
    feedback_target: str,
    run_dir: Path,
    progress: bool,
) -> tuple[Path, Path]:
    from rlhf.trainer.config import PPOConfig
    from rlhf.trainer.ppo import run_ppo

    ppo_cfg = PPOConfig(
        **_job_common(cfg, preset, feedback_target, progress),
        run_dir=str(run_dir / "ppo"),
        model=str(sft_path),
        snapshot=f"demo-ppo-prompts-s{cfg.seed}",
        prompt_kinds=["prompt"],
        generation_target=generation_target,
        reward_target=reward_target,
        batch_size=preset.ppo_rollouts,
        micro_batch_size=preset.ppo_rollouts,
        response_length=preset.max_new_tokens,
        temperature=preset.temperature,
        max_steps=preset.ppo_iterations,
        learning_rate=preset.ppo_learning_rate,
        kl_coef=preset.ppo_kl_coef,
        adaptive_kl=preset.ppo_target_kl is not None,
        **({"target_kl": preset.ppo_target_kl} if preset.ppo_target_kl is not None else {}),
        advantage_estimator=preset.ppo_advantage,
        samples_per_prompt=preset.ppo_samples_per_prompt,
        num_ppo_epochs=preset.ppo_epochs,
        num_mini_batches=preset.ppo_mini_batches,
    )
    final = Path(run_ppo(ppo_cfg))
    return final, run_dir / "ppo" / "metrics.jsonl"


# ---- evaluation ---------------------------------------------------------------------------------------------


def reward_model_accuracy(store, rm_client, snapshot: str, pool, rm_path: Path) -> dict:
    """Held-out accuracy of the served RM on the snapshot's eval comparisons, beside the Bayes optimum of the
    labelers' noise on the same comparisons and the share of those labels that agree with gold."""
    from rlhf.feedback import records as rec

    comparisons = [
        rec.exported_record(m) for m in store.export(snapshot=snapshot, split="eval", kinds=["comparison"])
    ]
    comparisons = [
        c for c in comparisons if len(c.responses) == 2 and c.responses[0].text != c.responses[1].text
    ]
    out: dict = {"eval_comparisons": len(comparisons)}
    try:
        from rlhf.reward.checkpoint import read_reward_metadata

        meta = read_reward_metadata(rm_path)
        out["trainer_eval_accuracy"] = meta.get("eval_accuracy")
    except Exception as exc:  # the metadata is informative only
        log.warning("could not read %s metadata: %s", rm_path, exc)
    if not comparisons:
        return out
    items = []
    for c in comparisons:
        prompt = rec.prompt_value(c.prompt)
        items += [(prompt, c.responses[0].text), (prompt, c.responses[1].text)]
    distinct = list(dict.fromkeys(items))  # a reply is in several comparisons: scored once
    score_of = dict(zip(distinct, rm_client.score(distinct), strict=True))
    scores = [score_of[item] for item in items]
    scored = scored_pair_accuracy(
        comparisons, list(zip(scores[::2], scores[1::2], strict=True)), pool.by_id()
    )
    accuracy, low, high = ev.bootstrap_mean_ci(scored["hits"])
    out.update(
        eval_accuracy=accuracy,
        eval_accuracy_ci=[low, high],
        bayes_optimal_accuracy=scored["bayes_optimal_accuracy"],
        label_gold_agreement=scored["label_gold_agreement"],
        gold_pair_accuracy=scored["gold_pair_accuracy"],
        by_pair_kind=scored["by_kind"],
    )
    return out


def evaluate_policies(
    cfg,
    preset: Preset,
    policy,
    rm_client,
    prompts: list[str],
    models: dict[str, Path],
    *,
    reference: Path,
    progress: bool,
) -> dict:
    """``preset.eval_samples`` samples per eval prompt from each policy (loaded into the generation service in
    turn); gold, RM scores, lengths, distinct-n; KL to the reference (SFT) model per response, from token
    logprobs. Samples are kept prompt-major (the k samples of prompt i at i*k ... i*k+k-1)."""
    from rlhf.core.chat import encode_prompt
    from rlhf.core.models import load_causal_lm, load_tokenizer

    k = preset.eval_samples
    tokenizer = load_tokenizer(reference)
    ref_model = load_causal_lm(reference)
    prompt_ids = [ids for p in prompts for ids in [encode_prompt(tokenizer, p)] * k]
    sample_prompts = [p for p in prompts for _ in range(k)]
    evals: dict[str, ev.PolicyEval] = {}
    version = int(policy.model_info().version or 0)
    # PPO's weights are the ones being served now: evaluate it first, then load the others.
    for name in ["PPO", *[n for n in models if n != "PPO"]]:
        if name != "PPO":
            version += 1
            version = policy.update_weights(version=version, checkpoint_path=str(models[name]))
        samples = [
            sample
            for g in generate(
                policy,
                prompts,
                n=k,
                max_new_tokens=preset.max_new_tokens,
                temperature=preset.temperature,
                seed=cfg.seed * 1000 + 7,
                batch=preset.generation_batch,
                desc=f"eval {name}",
                progress=progress,
            )
            for sample in g
        ]
        texts = [s.text for s in samples]
        gold = [gold_score(s.text, finished=s.finished) for s in samples]
        rm_scores = rm_client.score(list(zip(sample_prompts, texts, strict=True)))
        kl = None
        if name != "SFT":
            ref_lp = ev.reference_logprobs(
                ref_model,
                prompt_ids,
                [s.token_ids for s in samples],
                temperature=preset.temperature,
                pad_id=tokenizer.pad_token_id or 0,
            )
            kl = ev.kl_per_response([s.logprobs for s in samples], ref_lp)
        evals[name] = ev.summarize(
            name,
            texts,
            gold,
            [len(s.token_ids) for s in samples],
            [s.finished for s in samples],
            kl=kl,
            rm_scores=rm_scores,
            seed=cfg.seed,
            group=k,
        )
    ordered = {n: evals[n] for n in ("base", "SFT", "PPO") if n in evals}
    win, lo, hi = ev.win_rate_ci(ordered["PPO"].gold, ordered["SFT"].gold, group=k, seed=cfg.seed)
    sft_win, sft_lo, sft_hi = ev.win_rate_ci(
        ordered["SFT"].gold, ordered["base"].gold, group=k, seed=cfg.seed
    )
    all_gold = [g for e in ordered.values() for g in e.gold]
    all_rm = [r for e in ordered.values() for r in (e.rm_scores or [])]
    return {
        "evals": {n: e.to_dict() for n, e in ordered.items()},
        "eval_samples": k,
        "win_rate": {
            "name": "PPO over SFT by gold",
            "rate": win,
            "low": lo,
            "high": hi,
            "n": len(prompts),
            "samples_per_prompt": k,
            # where the wins come from: against SFT replies that ended on their own vs. ones the length
            # limit cut off (the cut-off penalty alone decides most of the latter)
            "by_sft_reply": ev.win_rate_by(
                ordered["PPO"].gold,
                ordered["SFT"].gold,
                ["finished" if f else "cut_off" for f in ordered["SFT"].finished],
                group=k,
            ),
        },
        "sft_win_rate": {"name": "SFT over base by gold", "rate": sft_win, "low": sft_lo, "high": sft_hi},
        "rm_vs_gold": {"spearman": ev.spearman(all_gold, all_rm), "pearson": ev.pearson(all_gold, all_rm)},
    }


def targets(results: dict) -> list[dict]:
    """The issue's targets for the default demo, each with what this run reached."""
    out = []
    win = results.get("win_rate")
    if win:
        out.append(
            {
                "name": "PPO beats SFT (gold, pairwise)",
                "wanted": ">= 80%",
                "reached": f"{win['rate']:.1%}",
                "met": win["rate"] >= 0.8,
            }
        )
    evals = results.get("evals", {})
    ppo, sft = evals.get("PPO"), evals.get("SFT")
    if ppo and "kl_mean" in ppo["summary"]:
        kl = ppo["summary"]["kl_mean"]
        out.append(
            {
                "name": "KL(PPO || SFT) per response",
                "wanted": "<= 10 nats",
                "reached": f"{kl:.2f}",
                "met": kl <= 10,
            }
        )
    if ppo and sft:
        d_ppo, d_sft = ppo["summary"]["distinct_2"], sft["summary"]["distinct_2"]
        out.append(
            {
                "name": "no collapse in distinct-2 (PPO >= 0.5 x SFT)",
                "wanted": f">= {0.5 * d_sft:.3f}",
                "reached": f"{d_ppo:.3f}",
                "met": d_ppo >= 0.5 * d_sft,
            }
        )
    rm = results.get("reward_model", {})
    if rm.get("eval_accuracy") is not None and rm.get("bayes_optimal_accuracy") is not None:
        gap = rm["bayes_optimal_accuracy"] - rm["eval_accuracy"]
        out.append(
            {
                "name": "RM held-out accuracy within 3 points of Bayes-optimal",
                "wanted": f">= {rm['bayes_optimal_accuracy'] - 0.03:.3f}",
                "reached": f"{rm['eval_accuracy']:.3f} (Bayes {rm['bayes_optimal_accuracy']:.3f})",
                "met": gap <= 0.03,
            }
        )
    return out
