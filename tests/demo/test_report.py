"""The report renders from synthetic inputs: plots are real PNGs, the Markdown carries the numbers."""

from __future__ import annotations

import json

from rlhf.demo.evaluate import summarize
from rlhf.demo.report import curve_series, load_metrics, sample_table, targets, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(path, n=6):
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "iteration": i,
                        "reward_mean": 0.1 * i,
                        "kl": 0.2 * i,
                        "entropy": 2.0 - 0.1 * i,
                        "policy_loss": -0.01 * i,
                        "value_loss": 1.0 / (i + 1),
                    }
                )
                + "\n"
            )
        f.write("not json\n\n")


def _results(tmp_path, with_metrics=True):
    prompts = ["Write a review | of a cafe.", "Tell a story about a cat."]
    sft = summarize(
        "SFT", ["It was fine.", "A cat sat."], [0.2, 0.0], [4, 4], [True, True], rm_scores=[0.1, -0.2]
    )
    ppo = summarize(
        "PPO",
        ["I loved it, wonderful!", "A happy cat found a lovely home."],
        [0.9, 0.8],
        [6, 8],
        [True, True],
        kl=[1.5, 2.5],
        rm_scores=[1.1, 0.9],
    )
    results = {
        "title": "Synthetic demo",
        "command": "rlhf demo --preset tiny",
        "preset": "tiny",
        "evals": {"SFT": sft.to_dict(), "PPO": ppo.to_dict()},
        "eval_prompts": prompts,
        "win_rate": {
            "name": "PPO over SFT",
            "rate": 1.0,
            "low": 1.0,
            "high": 1.0,
            "n": 2,
            "by_sft_reply": {
                "cut_off": {"rate": 0.875, "pairs": 8},
                "finished": {"rate": 0.4375, "pairs": 16},
            },
        },
        "reward_model": {
            "eval_accuracy": 0.71,
            "bayes_optimal_accuracy": 0.74,
            "label_gold_agreement": 0.73,
            "by_pair_kind": {
                "one_cut_off": {
                    "comparisons": 12,
                    "accuracy": 0.625,
                    "gold_pair_accuracy": 0.75,
                    "bayes_optimal_accuracy": 0.8125,
                    "label_gold_agreement": 0.6875,
                }
            },
        },
        "targets": [{"name": "KL(PPO || SFT)", "wanted": "<= 10", "reached": "2.0", "met": True}],
        "checkpoints": {"SFT": str(tmp_path / "sft"), "PPO": str(tmp_path / "ppo")},
        "stage_seconds": {"sft": 1.0},
    }
    if with_metrics:
        _metrics(tmp_path / "metrics.jsonl")
        results["metrics_path"] = str(tmp_path / "metrics.jsonl")
    return results


def test_load_metrics_skips_bad_lines(tmp_path):
    _metrics(tmp_path / "m.jsonl", n=3)
    assert [r["iteration"] for r in load_metrics(tmp_path / "m.jsonl")] == [0, 1, 2]
    assert load_metrics(tmp_path / "missing.jsonl") == []


def test_curve_series_picks_known_keys_against_the_iteration():
    rows = [
        {"step": 1, "reward_mean": 0.5, "kl": 0.1},
        {"step": 2, "reward_mean": 0.7},
        {"step": 3, "kl": float("nan")},
    ]
    series = curve_series(rows)
    assert series["reward (RM score, mean)"] == ("reward_mean", [1.0, 2.0], [0.5, 0.7])
    assert series["KL(policy || SFT) per response"] == ("kl", [1.0], [0.1])
    assert "entropy per token" not in series
    # a fixed KL coefficient is no curve; an adapted one is
    fixed = [{"step": i, "kl_coef": 0.05} for i in range(3)]
    assert "KL coefficient" not in curve_series(fixed)
    adapted = [{"step": i, "kl_coef": 0.05 * (1 + i / 10)} for i in range(3)]
    assert curve_series(adapted)["KL coefficient"][0] == "kl_coef"


def test_report_writes_pngs_and_markdown_with_the_numbers(tmp_path):
    report = write_report(tmp_path, _results(tmp_path))
    text = report.read_text()
    for png in ("ppo_curves.png", "gold_distributions.png", "rm_vs_gold.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in text
    assert "+0.850" in text  # PPO gold mean
    assert "2.00 [" in text  # PPO KL mean
    assert "0.710" in text and "0.740" in text  # RM accuracy vs Bayes-optimal
    assert "| one reply cut off by the length limit | 12 | 0.625 | 0.812 | 0.750 | 0.688 |" in text
    assert "against SFT replies that ended on their own 43.8% of 16 pairs" in text
    assert "against SFT replies that the length limit cut off 87.5% of 8 pairs" in text
    assert "100.0%" in text
    assert "Write a review \\| of a cafe." in text  # pipes escaped in the sample table
    assert str(tmp_path / "ppo") in text
    assert "| KL(PPO \\|\\| SFT) | <= 10 | 2.0 | yes |" in text  # pipes in a cell do not split it


def test_report_without_ppo_metrics_still_renders(tmp_path):
    results = _results(tmp_path, with_metrics=False)
    results["metrics_path"] = str(tmp_path / "none.jsonl")
    report = write_report(tmp_path, results)
    assert (tmp_path / "ppo_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert report.exists()


def test_sample_table_shows_both_policies_with_gold():
    table = sample_table(["p1", "p2"], ("SFT", ["a", ""], [0.1, -2.0]), ("PPO", ["b", "c"], [0.5, 0.6]), n=5)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "*(empty)* (-2.00)" in lines[3] and "c (+0.60)" in lines[3]


def _eval(gold_mean, distinct_2, kl=None):
    summary = {"gold_mean": gold_mean, "distinct_2": distinct_2}
    if kl is not None:
        summary["kl_mean"] = kl
    return {"summary": summary}


def test_targets_compare_each_figure_with_the_issue_threshold():
    results = {
        "win_rate": {"rate": 0.85},
        "evals": {"SFT": _eval(0.3, 0.6), "PPO": _eval(0.8, 0.25, kl=12.0)},
        "reward_model": {"eval_accuracy": 0.70, "bayes_optimal_accuracy": 0.72},
    }
    met = {t["name"]: t["met"] for t in targets(results)}
    assert met == {
        "PPO beats SFT (gold, pairwise)": True,
        "KL(PPO || SFT) per response": False,
        "no collapse in distinct-2 (PPO >= 0.5 x SFT)": False,
        "RM held-out accuracy within 3 points of Bayes-optimal": True,
    }
