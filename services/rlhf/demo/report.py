"""The demo's report: PNG plots (matplotlib, no display needed) and one Markdown file in the run directory.

:func:`write_report` takes the plain ``results`` dict the demo collects (see ``rlhf.demo.cli``) and writes:

* ``ppo_curves.png``: reward, KL, entropy and losses per PPO iteration, from the PPO job's ``metrics.jsonl``;
* ``gold_distributions.png``: the gold score of base, SFT and PPO replies to the eval prompts;
* ``rm_vs_gold.png``: the reward model's score against the gold score on the same replies;
* ``report.md``: the headline numbers against the targets, the plots, and a table of SFT vs PPO samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from rlhf.core.files import atomic_write_text
from rlhf.demo.evaluate import spearman

# Panels of the PPO plot: (title, candidate keys in metrics.jsonl, first found wins).
CURVE_PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("reward (RM score, mean)", ("reward_mean", "score_mean", "reward", "rlhf_ppo_reward_mean")),
    ("KL(policy || SFT) per response", ("kl", "kl_mean", "objective/kl", "rlhf_ppo_kl")),
    ("entropy per token", ("entropy", "entropy_mean", "rlhf_ppo_entropy")),
    ("policy loss", ("policy_loss", "pg_loss", "loss/policy", "rlhf_ppo_policy_loss")),
    ("value loss", ("value_loss", "vf_loss", "loss/value", "rlhf_ppo_value_loss")),
    ("clip fraction", ("clipfrac", "clip_frac", "policy_clipfrac", "rlhf_ppo_clipfrac")),
    ("KL coefficient", ("kl_coef", "rlhf_ppo_kl_coef")),
    ("response length (tokens)", ("response_length", "response_length_mean", "rlhf_ppo_response_length")),
]
X_KEYS = ("iteration", "step", "update")
# panels left out when their value never changes: a fixed KL coefficient is a setting, not a curve
HIDDEN_WHEN_CONSTANT = {"KL coefficient"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file (bad or blank lines are skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def curve_series(rows: Sequence[dict]) -> dict[str, tuple[str, list[float], list[float]]]:
    """For each panel title with data: (key used, x values, y values)."""
    out = {}
    for title, keys in CURVE_PANELS:
        for key in keys:
            xs, ys = [], []
            for index, row in enumerate(rows):
                y = _number(row.get(key))
                if y is None:
                    continue
                x = next((_number(row.get(k)) for k in X_KEYS if _number(row.get(k)) is not None), None)
                xs.append(x if x is not None else float(index))
                ys.append(y)
            if ys:
                if not (title in HIDDEN_WHEN_CONSTANT and len(set(ys)) == 1):
                    out[title] = (key, xs, ys)
                break
    return out


def plot_training_curves(rows: Sequence[dict], out: str | Path) -> Path:
    """One panel per PPO statistic found in ``rows``."""
    plt = _plt()
    series = curve_series(rows)
    n = max(1, len(series))
    cols = 2 if n > 1 else 1
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.0 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    if not series:
        flat[0].text(0.5, 0.5, "no PPO metrics recorded", ha="center", va="center")
        flat[0].set_axis_off()
    for ax, (title, (key, xs, ys)) in zip(flat, series.items(), strict=False):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, linewidth=1.5)
        ax.set_title(f"{title}  [{key}]", fontsize=9)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    for ax in flat[len(series) :]:
        ax.set_axis_off()
    return _save(plt, fig, out)


def plot_gold_distributions(scores: dict[str, Sequence[float]], out: str | Path) -> Path:
    """Overlaid histograms of the gold score per policy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    all_values = [v for values in scores.values() for v in values]
    low = min(all_values, default=-2.0)
    high = max(all_values, default=1.0)
    if high <= low:
        high = low + 1.0
    bins = [low + (high - low) * i / 30 for i in range(31)]
    for name, values in scores.items():
        if values:
            avg = sum(values) / len(values)
            ax.hist(list(values), bins=bins, alpha=0.45, label=f"{name} (mean {avg:+.3f})")
    ax.set_xlabel("gold score")
    ax.set_ylabel("eval replies")
    ax.set_title("Gold score of replies to held-out prompts")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out)


def plot_rm_vs_gold(points: dict[str, tuple[Sequence[float], Sequence[float]]], out: str | Path) -> Path:
    """Scatter of (gold, RM score) per policy, with the rank correlation over all points in the title."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs_all, ys_all = [], []
    for name, (gold, rm) in points.items():
        ax.scatter(list(gold), list(rm), s=12, alpha=0.6, label=name)
        xs_all += list(gold)
        ys_all += list(rm)
    rho = spearman(xs_all, ys_all) if len(xs_all) >= 2 else float("nan")
    ax.set_xlabel("gold score")
    ax.set_ylabel("reward model score")
    ax.set_title(f"Reward model vs gold (Spearman {rho:.2f}, n={len(xs_all)})")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, out)


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "*(empty)*"


def sample_table(
    prompts: Sequence[str],
    left: tuple[str, Sequence[str], Sequence[float]],
    right: tuple[str, Sequence[str], Sequence[float]],
    n: int = 8,
) -> str:
    """Markdown table: prompt | left reply (gold) | right reply (gold), for the first ``n`` prompts."""
    (lname, ltexts, lgold), (rname, rtexts, rgold) = left, right
    lines = [f"| prompt | {lname} (gold) | {rname} (gold) |", "| --- | --- | --- |"]
    for i in range(min(n, len(prompts))):
        lines.append(
            f"| {_cell(prompts[i], 120)} | {_cell(ltexts[i])} ({lgold[i]:+.2f}) | {_cell(rtexts[i])} ({rgold[i]:+.2f}) |"
        )
    return "\n".join(lines)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _policy_table(evals: dict[str, dict]) -> str:
    lines = [
        "| policy | gold mean [95% CI] | KL vs SFT (nats/reply) | words | finished | distinct-1 | distinct-2 | distinct-3 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, ev in evals.items():
        s = ev["summary"]
        kl = f"{s['kl_mean']:.2f} [{s['kl_ci_low']:.2f}, {s['kl_ci_high']:.2f}]" if "kl_mean" in s else "—"
        lines.append(
            f"| {name} | {s['gold_mean']:+.3f} [{s['gold_ci_low']:+.3f}, {s['gold_ci_high']:+.3f}] | {kl} | "
            f"{s['mean_words']:.1f} | {s['finished_rate']:.0%} | {s['distinct_1']:.3f} | {s['distinct_2']:.3f} | "
            f"{s['distinct_3']:.3f} |"
        )
    return "\n".join(lines)


def _targets_table(targets: Sequence[dict]) -> str:
    lines = ["| target | wanted | reached | met |", "| --- | --- | --- | :---: |"]
    for t in targets:
        name, wanted, reached = (str(t[k]).replace("|", "\\|") for k in ("name", "wanted", "reached"))
        lines.append(f"| {name} | {wanted} | {reached} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


PAIR_KIND_NAMES = {
    "both_finished": "both replies ended on their own",
    "one_cut_off": "one reply cut off by the length limit",
    "both_cut_off": "both replies cut off",
}


def _pair_kind_table(by_kind: dict[str, dict]) -> str:
    """The RM's held-out accuracy per kind of comparison pair, beside what the labels allow."""
    lines = [
        "| held-out pairs | n | RM accuracy | Bayes-optimal | RM agrees with gold | labels agree with gold |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, part in by_kind.items():
        lines.append(
            f"| {PAIR_KIND_NAMES.get(kind, kind)} | {part['comparisons']} | {_fmt(part['accuracy'])} | "
            f"{_fmt(part.get('bayes_optimal_accuracy'))} | {_fmt(part.get('gold_pair_accuracy'))} | "
            f"{_fmt(part.get('label_gold_agreement'))} |"
        )
    return "\n".join(lines)


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


def _win_rate_lines(win: dict) -> list[str]:
    k = int(win.get("samples_per_prompt", 1))
    lines = [
        f"**{win['name']}**: {win['rate']:.1%} (95% CI {win['low']:.1%} – {win['high']:.1%}) of "
        f"{win.get('n', '?')} prompts"
        + (
            f" ({k} samples per prompt and policy: every PPO sample against every SFT sample of its prompt)"
            if k > 1
            else ""
        )
        + ", ties counting one half.",
        "",
    ]
    split = win.get("by_sft_reply") or {}
    if split:
        names = {"finished": "that ended on their own", "cut_off": "that the length limit cut off"}
        parts = [
            f"against SFT replies {names.get(label, label)} {part['rate']:.1%} of {part['pairs']} pairs"
            for label, part in split.items()
        ]
        lines += ["By the SFT reply: " + "; ".join(parts) + ".", ""]
    return lines


def _feedback_line(fb: dict) -> str:
    return (
        f"- trained on {fb.get('comparisons', '?')} comparisons ({fb.get('base_comparisons', 0)} of base "
        f"samples, {fb.get('sft_comparisons', fb.get('comparisons', '?'))} of SFT samples; each pair "
        f"judged by {fb.get('labelers_per_pair', 1)} different comparer(s), one record each) and "
        f"{fb.get('ratings', '?')} ratings, less the held-out prompts' share"
    )


def _reward_model_lines(rm: dict, fb: dict) -> list[str]:
    ci = rm.get("eval_accuracy_ci")
    lines = [
        "## Reward model",
        "",
        f"- held-out accuracy on labeler comparisons (scored by the reward service): "
        f"{_fmt(rm.get('eval_accuracy'))}"
        + (
            f" (95% CI {ci[0]:.3f} – {ci[1]:.3f}, {rm.get('eval_comparisons', '?')} comparisons)"
            if ci
            else ""
        ),
        f"- Bayes-optimal accuracy of the noisy labelers on the same comparisons: "
        f"{_fmt(rm.get('bayes_optimal_accuracy'))}",
        f"- labels that agree with gold: {_fmt(rm.get('label_gold_agreement'))}",
    ]
    if fb:
        lines.append(_feedback_line(fb))
    if rm.get("trainer_eval_accuracy") is not None:
        lines.append(
            "- the RM trainer's own eval accuracy (eval split incl. pairs from ratings): "
            f"{_fmt(rm['trainer_eval_accuracy'])}"
        )
    if rm.get("gold_pair_accuracy") is not None:
        lines.append(
            f"- RM agrees with gold on held-out comparison pairs: {_fmt(rm.get('gold_pair_accuracy'))}"
        )
    if rm.get("spearman_vs_gold") is not None:
        lines.append(f"- Spearman(RM score, gold) on eval replies: {_fmt(rm['spearman_vs_gold'])}")
    lines.append("")
    if rm.get("by_pair_kind"):
        lines += [_pair_kind_table(rm["by_pair_kind"]), ""]
    return lines


def _plot_lines(run_dir: Path, results: dict, evals: dict[str, dict]) -> list[str]:
    """Draws the plots into ``run_dir``; the report's lines that show them."""
    plots = []
    if results.get("metrics_path") is not None:
        plot_training_curves(load_metrics(results["metrics_path"]), run_dir / "ppo_curves.png")
        plots.append(("PPO training curves", "ppo_curves.png"))
    plot_gold_distributions({n: ev["gold"] for n, ev in evals.items()}, run_dir / "gold_distributions.png")
    plots.append(("Gold score distributions", "gold_distributions.png"))
    rm_points = {n: (ev["gold"], ev["rm_scores"]) for n, ev in evals.items() if ev.get("rm_scores")}
    if rm_points:
        plot_rm_vs_gold(rm_points, run_dir / "rm_vs_gold.png")
        plots.append(("Reward model score vs gold", "rm_vs_gold.png"))
    lines = ["## Plots", ""]
    for title, name in plots:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return lines


def _sample_lines(results: dict, evals: dict[str, dict]) -> list[str]:
    prompts = results.get("eval_prompts") or []
    names = list(evals)
    if not prompts or len(names) < 2:
        return []
    left, right = ("SFT", "PPO") if {"SFT", "PPO"} <= set(names) else (names[-2], names[-1])
    k = int(results.get("eval_samples", 1))  # samples are prompt-major: the first of each prompt
    table = sample_table(
        prompts,
        (left, evals[left]["texts"][::k], evals[left]["gold"][::k]),
        (right, evals[right]["texts"][::k], evals[right]["gold"][::k]),
        n=int(results.get("sample_rows", 10)),
    )
    return [f"## Sample replies: {left} vs {right}", "", table, ""]


def _closing_lines(results: dict) -> list[str]:
    lines = []
    if results.get("checkpoints"):
        lines += ["## Checkpoints (Hugging Face folders)", ""]
        lines += [f"- {name}: `{path}`" for name, path in results["checkpoints"].items()]
        lines.append("")
    if results.get("stage_seconds"):
        lines += ["## Time per stage", "", "| stage | seconds |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["stage_seconds"].items()]
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return lines


def write_report(run_dir: str | Path, results: dict) -> Path:
    """Write the plots and ``report.md`` into ``run_dir``; returns the report's path.

    ``results`` keys (all optional except ``evals``): ``title``, ``command``, ``preset``, ``evals`` {name:
    PolicyEval.to_dict()} in display order, ``eval_prompts`` [str], ``win_rate`` {"name", "rate", "low",
    "high"}, ``reward_model`` {"eval_accuracy", "bayes_optimal_accuracy", "label_gold_agreement", ...},
    ``targets`` [{"name", "wanted", "reached", "met"}], ``metrics_path``, ``checkpoints`` {name: path},
    ``stage_seconds`` {stage: seconds}, ``notes`` [str].
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    evals: dict[str, dict] = results["evals"]
    lines = [f"# {results.get('title', 'RLHF demo report')}", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    if results.get("preset"):
        lines += [f"Preset: **{results['preset']}**", ""]
    if results.get("targets"):
        lines += ["## Targets", "", _targets_table(results["targets"]), ""]
    lines += ["## Policies on the held-out eval prompts", "", _policy_table(evals), ""]
    if results.get("win_rate"):
        lines += _win_rate_lines(results["win_rate"])
    if results.get("reward_model"):
        lines += _reward_model_lines(results["reward_model"], results.get("feedback") or {})
    lines += _plot_lines(run_dir, results, evals)
    lines += _sample_lines(results, evals)
    lines += _closing_lines(results)
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
