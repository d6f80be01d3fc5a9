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
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from rlhf.core.files import atomic_write_text
from rlhf.core.launcher import Interrupted, Launcher, ServiceProcess
from rlhf.core.models import set_torch_threads
from rlhf.core.prompt_proto import make_prompt
from rlhf.demo import evaluate as ev
from rlhf.demo.config import DemoConfig, command_line, resolve
from rlhf.demo.jobs import (
    base_model_path,
    ppo_config,
    reward_model_config,
    sft_config,
    start_services,
    threads_env,
    train_ppo,
    train_reward_model,
    train_sft,
)
from rlhf.demo.labelers import (
    Candidate,
    LabelerPool,
    collect_comparisons,
    collect_demonstrations,
    collect_ratings,
    default_pool,
    register_labelers,
    scored_pair_accuracy,
)
from rlhf.demo.progress import StageClock
from rlhf.demo.report import targets, write_report
from rlhf.demo.sampling import Generated, sample
from rlhf.demo.task import gold_score, load_prompts
from rlhf.feedback.client import FeedbackClient
from rlhf.generation.client import PolicyClient
from rlhf.reward.checkpoint import read_reward_metadata
from rlhf.reward.client import RewardClient
from rlhf.trainer.job import JobStopped
from rlhf.v1 import feedback_pb2

log = logging.getLogger("rlhf.demo")


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


class DemoInterrupted(Exception):
    """The demo stopped before its report: Ctrl-C, SIGTERM or a trainer job's Stop. Raised after the services
    were stopped; ``exit_code`` is 128 + the signal number (as a killed process would have) or the stopped
    job's exit code."""

    def __init__(self, run_dir: Path, stage: str | None, reason: str, exit_code: int):
        super().__init__(f"the demo stopped during the {stage or 'setup'} stage ({reason})")
        self.run_dir, self.stage, self.reason, self.exit_code = run_dir, stage, reason, exit_code


@dataclass
class Prompts:
    """The task's prompts as the stages use them: disjoint slices of the shuffled train prompts."""

    train: list[str]
    eval: list[str]
    demo: list[str]
    comparison: list[str]
    rating: list[str]


def split_prompts(settings: DemoConfig) -> Prompts:
    train = [p["prompt"] for p in load_prompts("train")]
    held_out = [p["prompt"] for p in load_prompts("eval")]
    shuffled = train[:]
    random.Random(settings.seed).shuffle(shuffled)

    def take(start: int, count: int) -> list[str]:
        # wrap around the train prompts when a preset asks for more than there are
        return [shuffled[(start + i) % len(shuffled)] for i in range(count)]

    demo_end = settings.demo_prompts
    comparison_end = demo_end + settings.comparison_prompts
    return Prompts(
        train=train,
        eval=held_out[: settings.eval_prompts] if settings.eval_prompts else held_out,
        demo=take(0, settings.demo_prompts),
        comparison=take(demo_end, settings.comparison_prompts),
        rating=take(comparison_end, settings.rating_prompts),
    )


@dataclass
class Run:
    """What the stages share: the settings, the run folder, the clients of the services, what was found."""

    settings: DemoConfig
    run_dir: Path
    clock: StageClock
    prompts: Prompts
    pool: LabelerPool
    rng: random.Random
    results: dict
    checkpoints: dict[str, str] = field(default_factory=dict)
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    store: FeedbackClient | None = None
    policy: PolicyClient | None = None
    rm_client: RewardClient | None = None

    @property
    def tag(self) -> str:
        return f"s{self.settings.seed}"

    def snapshot(self, use: str) -> str:
        """The name of the store snapshot the ``use`` stage trains on (one per seed)."""
        return f"demo-{use}-{self.tag}"


def candidate_groups(
    groups: Sequence[Sequence[Generated]], version: str
) -> list[tuple[str, list[Candidate]]]:
    """Each prompt's samples as (prompt, the labelers' candidates), tagged with the policy that wrote them."""
    return [
        (g[0].prompt, [Candidate(text=x.text, finished=x.finished, model_version=version) for x in g])
        for g in groups
    ]


def all_pairs(groups: Sequence[tuple[str, Sequence[Candidate]]]) -> list[tuple[str, Candidate, Candidate]]:
    """Every pair of distinct, non-empty candidates of each prompt, as (prompt, a, b) to compare."""
    items = []
    for prompt, candidates in groups:
        unique = list({c.text: c for c in candidates if c.text.strip()}.values())
        items += [(prompt, a, b) for a, b in combinations(unique, 2)]
    return items


# ---- the stages ---------------------------------------------------------------------------------------------


def start_stage(run: Run, launcher: Launcher) -> None:
    run.clock.begin("services", "feedback store, generation, reward")
    base = base_model_path(run.settings, run.run_dir)
    run.checkpoints["base"] = str(base)
    run.services = start_services(launcher, run.settings, run.run_dir, base)
    run.results["services"] = {name: s.target for name, s in launcher.services.items()}
    run.clock.end()


def seed_store(run: Run) -> None:
    """The labelers and the train prompts into the store; PPO's prompt snapshot."""
    register_labelers(run.store, run.pool.all())
    records = [
        feedback_pb2.PromptRecord(
            idempotency_key=f"demo:prompt:{p}", prompt=make_prompt(p), source="demo-train"
        )
        for p in run.prompts.train
    ]
    run.store.add_prompts(records)
    seed = run.settings.seed
    run.store.create_snapshot(run.snapshot("ppo-prompts"), kinds=["prompt"], eval_fraction=0.0, seed=seed)


def demonstrations_stage(run: Run) -> int:
    """The gold-best of k base samples per prompt as demonstrations; every pair of them compared too. Returns
    how many comparisons of base samples were written."""
    s = run.settings
    run.clock.begin("demonstrations", f"best of {s.demo_k} base samples for {len(run.prompts.demo)} prompts")
    groups = sample(
        s,
        run.policy,
        run.prompts.demo,
        n=s.demo_k,
        seed_stream=1,
        desc="base samples",
        temperature=s.demo_temperature,
    )
    candidates = candidate_groups(groups, "base")
    collect_demonstrations(run.store, run.pool.demonstrator, candidates, tag=run.tag)
    base_compared = []
    if s.base_comparisons:
        # the reward model learns from the base samples' pairs together with the SFT samples' pairs
        base_compared = collect_comparisons(
            run.store,
            run.pool.comparers,
            all_pairs(candidates),
            tag=f"{run.tag}-base",
            rng=run.rng,
            labelers_per_pair=s.comparison_labelers,
        )
    run.store.create_snapshot(run.snapshot("sft"), kinds=["demonstration"], eval_fraction=0.1, seed=s.seed)
    run.results["demonstrations"] = {
        "prompts": len(groups),
        "k": s.demo_k,
        "base_gold_mean": ev.mean([gold_score(x.text, finished=x.finished) for g in groups for x in g]),
        "demo_gold_mean": ev.mean([max(gold_score(x.text, finished=x.finished) for x in g) for g in groups]),
    }
    run.clock.end()
    return len(base_compared)


def sft_stage(run: Run) -> Path:
    """SFT on the demonstrations; the SFT model then serves the generation service."""
    s = run.settings
    run.clock.begin("sft", f"{s.sft_epochs:g} epochs on {len(run.prompts.demo)} demonstrations")
    base = Path(run.checkpoints["base"])
    sft_path = train_sft(sft_config(s, base, run.services, run.snapshot("sft"), run.run_dir))
    run.checkpoints["SFT"] = str(sft_path)
    run.policy.update_weights(version=1, checkpoint_path=str(sft_path))
    run.clock.end()
    return sft_path


def comparisons_stage(run: Run, base_comparisons: int) -> None:
    """SFT samples compared in pairs and rated by the simulated labelers; the reward model's snapshot."""
    s, k = run.settings, run.settings.comparison_samples
    run.clock.begin(
        "comparisons",
        f"{len(run.prompts.comparison)} prompts x {k * (k - 1) // 2} pairs of {k} SFT samples, "
        f"{s.comparison_labelers} comparer(s) per pair, {len(run.prompts.rating)} rated",
    )
    pairs = sample(s, run.policy, run.prompts.comparison, n=k, seed_stream=2, desc="SFT samples to compare")
    compared = collect_comparisons(
        run.store,
        run.pool.comparers,
        all_pairs(candidate_groups(pairs, "sft")),
        tag=run.tag,
        rng=run.rng,
        labelers_per_pair=s.comparison_labelers,
    )
    rated = sample(s, run.policy, run.prompts.rating, n=2, seed_stream=3, desc="SFT samples to rate")
    to_rate = [(prompt, c) for prompt, group in candidate_groups(rated, "sft") for c in group]
    ratings = collect_ratings(run.store, run.pool.raters, to_rate, tag=run.tag, rng=run.rng)
    run.store.create_snapshot(
        run.snapshot("rm"), kinds=["comparison", "rating"], eval_fraction=0.15, seed=s.seed
    )
    run.results["feedback"] = {
        "comparisons": len(compared) + base_comparisons,
        "sft_comparisons": len(compared),
        "base_comparisons": base_comparisons,
        "labelers_per_pair": s.comparison_labelers,
        "ratings": len(ratings),
    }
    run.clock.end()


def reward_model_accuracy(run: Run, rm_path: Path) -> dict:
    """Held-out accuracy of the served RM on the snapshot's eval comparisons, beside the Bayes optimum of the
    labelers' noise on the same comparisons and the share of those labels that agree with gold."""
    comparisons = ev.eval_comparisons(run.store, run.snapshot("rm"))
    out: dict = {"eval_comparisons": len(comparisons)}
    try:
        out["trainer_eval_accuracy"] = read_reward_metadata(rm_path).get("eval_accuracy")
    except Exception as exc:  # the metadata is informative only
        log.warning("could not read %s metadata: %s", rm_path, exc)
    if not comparisons:
        return out
    scores = ev.score_comparisons(run.rm_client, comparisons)
    scored = scored_pair_accuracy(comparisons, scores, run.pool.by_id())
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


def reward_model_stage(run: Run, sft_path: Path) -> None:
    """The reward model from the SFT model; loaded into the reward service and measured on held-out pairs."""
    s = run.settings
    layers = f", its top {s.trainable_layers} layers" if s.trainable_layers else ""
    run.clock.begin("reward_model", f"{s.rm_epochs:g} epoch(s) from the SFT model{layers}")
    rm_path = train_reward_model(
        reward_model_config(s, sft_path, run.services, run.snapshot("rm"), run.run_dir)
    )
    run.checkpoints["reward model"] = str(rm_path)
    run.rm_client.load_model(str(rm_path))
    run.results["reward_model"] = reward_model_accuracy(run, rm_path)
    run.clock.end()


def ppo_stage(run: Run, sft_path: Path) -> Path:
    s = run.settings
    run.clock.begin(
        "ppo",
        f"{s.ppo_iterations} iterations x {s.ppo_rollouts} rollouts "
        f"({s.samples_per_prompt} per prompt, {s.advantage_estimator.upper()} advantages)",
    )
    cfg = ppo_config(s, sft_path, run.services, run.snapshot("ppo-prompts"), run.run_dir)
    ppo_path, metrics_path = train_ppo(cfg)
    run.checkpoints["PPO"] = str(ppo_path)
    run.results["metrics_path"] = str(metrics_path)
    run.clock.end()
    return ppo_path


def evaluation_stage(run: Run, sft_path: Path, ppo_path: Path) -> None:
    run.clock.begin("evaluation", f"base, SFT and PPO on {len(run.prompts.eval)} held-out prompts")
    models = {"base": Path(run.checkpoints["base"]), "SFT": sft_path, "PPO": ppo_path}
    run.results.update(
        ev.evaluate_policies(
            run.settings, run.policy, run.rm_client, run.prompts.eval, models, reference=sft_path
        )
    )
    run.clock.end()


def report_stage(run: Run) -> DemoOutcome:
    run.clock.begin("report", str(run.run_dir / "report.md"))
    results = run.results
    results["checkpoints"] = run.checkpoints
    results["targets"] = targets(results)
    results["eval_prompts"] = run.prompts.eval
    run.clock.end()
    results["stage_seconds"] = dict(run.clock.seconds)
    results["total_seconds"] = time.monotonic() - run.clock.start
    report = write_report(run.run_dir, results)
    results_path = run.run_dir / "results.json"
    atomic_write_text(results_path, json.dumps(results, indent=1, default=str))
    return DemoOutcome(run.run_dir, report, results_path, run.checkpoints, results)


# ---- the run ------------------------------------------------------------------------------------------------


def _run_stages(run: Run) -> DemoOutcome:
    with Launcher(run.run_dir / "services", env=threads_env(run.settings.torch_threads)) as launcher:
        start_stage(run, launcher)
        with (
            FeedbackClient(run.services["feedback"].target) as run.store,
            PolicyClient(run.services["generation"].target, timeout=600) as run.policy,
            RewardClient(run.services["reward"].target, timeout=600) as run.rm_client,
        ):
            seed_store(run)
            base_comparisons = demonstrations_stage(run)
            sft_path = sft_stage(run)
            comparisons_stage(run, base_comparisons)
            reward_model_stage(run, sft_path)
            ppo_path = ppo_stage(run, sft_path)
            evaluation_stage(run, sft_path, ppo_path)
    return report_stage(run)


def _new_run(settings: DemoConfig, stamp: str) -> Run:
    run_dir = Path(settings.run_dir or Path("runs") / f"demo-{stamp}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "title": f"RLHF demo ({settings.preset} preset)",
        "command": command_line(settings),
        "preset": settings.preset,
        "preset_settings": settings.model_dump(exclude={"stage_estimates", "run_dir", "progress"}),
        "started_at": stamp,
    }
    return Run(
        settings=settings,
        run_dir=run_dir,
        clock=StageClock(settings.stage_estimates, enabled=settings.progress),
        prompts=split_prompts(settings),
        pool=default_pool(seed=settings.seed),
        rng=random.Random(settings.seed),
        results=results,
    )


def run_demo(cfg: DemoConfig) -> DemoOutcome:
    """Run the whole demo ``cfg`` asks for (its preset with what it sets); returns where everything was
    written. Raises :class:`DemoInterrupted` (after stopping the services) when it is stopped before the end."""
    settings = resolve(cfg)
    run = _new_run(settings, dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"))
    set_torch_threads(settings.torch_threads)
    os.environ.update(
        {k: v for k, v in threads_env(settings.torch_threads).items() if k != "RLHF_TORCH_THREADS"}
    )
    try:
        return _run_stages(run)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        raise DemoInterrupted(run.run_dir, run.clock.current, name, 128 + signum) from exc
    except JobStopped as exc:
        raise DemoInterrupted(
            run.run_dir, run.clock.current, f"trainer job stopped: {exc}", exc.exit_code
        ) from exc
