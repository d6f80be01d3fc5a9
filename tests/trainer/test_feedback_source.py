"""Jobs read a snapshot from a running feedback store (rlhf.v1.FeedbackService over gRPC)."""

from __future__ import annotations

import os

from rlhf.core.launcher import Launcher
from rlhf.feedback import jsonl
from rlhf.feedback import records as rec
from rlhf.feedback.client import FeedbackClient
from rlhf.trainer.config import RewardModelConfig, SFTConfig
from rlhf.trainer.data import load_comparisons, load_demonstrations
from rlhf.trainer.metrics import read_metrics
from rlhf.trainer.sft import run_sft


def test_sft_and_pairs_from_a_snapshot_on_a_feedback_server(tmp_path, tiny_lm_path, sft_jsonl, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLHF_TORCH_THREADS": "1"}
    args = ["--database-url", f"sqlite:///{tmp_path / 'fb.db'}", "--grace-seconds", "1"]
    with Launcher(tmp_path / "services", env=env) as launcher:
        target = launcher.start("feedback", ["serve", "feedback"], args=args, timeout=180).target
        with FeedbackClient(target) as client:
            with open(sft_jsonl) as f:
                jsonl.import_records(jsonl.read_jsonl(f), client)
            client.add_ratings(
                [
                    rec.make_rating("Rate me", "great answer", 6, idempotency_key="r1"),
                    rec.make_rating("Rate me", "poor answer", 2, idempotency_key="r2"),
                ]
            )
            snapshot = client.create_snapshot("sft-v1", eval_fraction=0.25, seed=5)
            later = rec.make_demonstration("after the snapshot", "not included", idempotency_key="late")
            client.add_demonstrations([later])

        demos = load_demonstrations(SFTConfig(feedback_target=target, snapshot="sft-v1"))
        pairs = load_comparisons(RewardModelConfig(feedback_target=target, snapshot="sft-v1"))
        assert len(demos.train) + len(demos.eval) == 64  # frozen: the later record is not in it
        assert len(demos.train) + len(pairs.train) <= snapshot.num_train  # two ratings make one pair
        assert len(demos.eval) > 0
        assert [(c.prompt, c.chosen, c.rejected) for c in pairs.train + pairs.eval] == [
            ("Rate me", "great answer", "poor answer")
        ]

        cfg = SFTConfig(
            model=str(tiny_lm_path),
            feedback_target=target,
            snapshot="sft-v1",
            run_dir=str(tmp_path / "run"),
            serve=False,
            metrics_port=-1,
            progress=False,
            max_steps=3,
            eval_every=0,
            torch_threads=1,
        )
        final = run_sft(cfg)

        from rlhf.cli import main

        code = main(
            ["train", "sft", "--feedback-target", target, "--snapshot", "no-such-snapshot", "--no-serve"]
        )
        err = capsys.readouterr().err
        assert code == 2 and "NOT_FOUND" in err and "no-such-snapshot" in err, err[-2000:]
    assert (final / "model.safetensors").exists()
    history = read_metrics(tmp_path / "run")
    assert [h["step"] for h in history] == [1, 2, 3] and "eval_loss" in history[-1]
