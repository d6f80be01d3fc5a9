"""SFT: the eval loss on held-out demonstrations goes down, and the result is a loadable HF folder."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from rlhf.core.models import load_causal_lm, load_tokenizer
from rlhf.trainer.config import SFTConfig
from rlhf.trainer.data import load_demonstrations
from rlhf.trainer.distributed import DistInfo
from rlhf.trainer.metrics import read_metrics
from rlhf.trainer.sft import encode_all, evaluate_loss, run_sft


def sft_config(tiny_lm_path, data_file, run_dir, **kw) -> SFTConfig:
    base = dict(
        model=str(tiny_lm_path),
        data_file=data_file,
        run_dir=str(run_dir),
        serve=False,
        metrics_port=-1,
        progress=False,
        max_steps=30,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=3e-3,
        eval_every=10,
        checkpoint_every=0,
        eval_fraction=0.25,
        torch_threads=1,
    )
    base.update(kw)
    return SFTConfig(**base)


def test_sft_lowers_eval_loss(tmp_path, tiny_lm_path, sft_jsonl):
    cfg = sft_config(tiny_lm_path, sft_jsonl, tmp_path / "run")
    tok = load_tokenizer(tiny_lm_path)
    evals = encode_all(tok, load_demonstrations(cfg).eval, cfg.max_length)
    assert len(evals) >= 5
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    before = evaluate_loss(load_causal_lm(tiny_lm_path), evals, cfg, cpu, tok.pad_token_id)

    final = run_sft(cfg)

    after = evaluate_loss(load_causal_lm(final), evals, cfg, cpu, tok.pad_token_id)
    assert after < 0.6 * before, (before, after)
    history = read_metrics(tmp_path / "run")
    assert [h["step"] for h in history] == list(range(1, 31))
    logged = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(logged) == 3 and abs(logged[-1] - after) < 1e-4
    assert history[-1]["loss"] < history[0]["loss"]
    assert load_tokenizer(final).chat_template  # the generation service formats prompts with it


def test_micro_batches_give_the_same_step_as_one_batch(tmp_path, tiny_lm_path, sft_jsonl):
    one = run_sft(sft_config(tiny_lm_path, sft_jsonl, tmp_path / "one", max_steps=3, micro_batch_size=8))
    four = run_sft(sft_config(tiny_lm_path, sft_jsonl, tmp_path / "four", max_steps=3, micro_batch_size=2))
    a, b = load_causal_lm(one).state_dict(), load_causal_lm(four).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_resume_with_another_batch_size_is_refused(tmp_path, tiny_lm_path, sft_jsonl):
    import pytest

    from rlhf.core.errors import FailedPrecondition

    run_sft(
        sft_config(tiny_lm_path, sft_jsonl, tmp_path / "r", max_steps=2, checkpoint_every=1, eval_every=0)
    )
    with pytest.raises(FailedPrecondition, match="batch_size=8"):
        run_sft(sft_config(tiny_lm_path, sft_jsonl, tmp_path / "r", max_steps=4, batch_size=4, resume=True))


def test_cli_names_the_problem_with_the_data(tmp_path, tiny_lm_path, capsys):
    from rlhf.cli import main

    missing = str(tmp_path / "nope.jsonl")
    code = main(["train", "sft", "--model", str(tiny_lm_path), "--data-file", missing, "--no-serve"])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err
    tiny = tmp_path / "two.jsonl"
    tiny.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    args = ["train", "sft", "--model", str(tiny_lm_path), "--data-file", str(tiny), "--no-serve"]
    assert main([*args, "--run-dir", str(tmp_path / "x"), "--metrics-port", "-1"]) == 2
    assert "batch_size: 8 is larger than the training set" in capsys.readouterr().err


def test_no_secret_reaches_the_run_folder_or_the_log(tmp_path, tiny_lm_path, sft_jsonl, caplog, capsys):
    """A job's files (config.json, metrics, checkpoints, the final model) and its log never hold its tokens."""
    secrets = {"auth_token": "tok-AUTH-3f9a", "feedback_token": "tok-FEEDBACK-77c1"}
    cfg = sft_config(tiny_lm_path, sft_jsonl, tmp_path / "run", max_steps=2, checkpoint_every=1, **secrets)
    with caplog.at_level("DEBUG"):
        final = run_sft(cfg)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert final.exists() and len(written) > 5
    logged = caplog.text + "".join(capsys.readouterr())
    for value in secrets.values():
        assert value not in logged
        for path in written:
            assert value.encode() not in path.read_bytes(), f"{value} written to {path}"
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["auth_token"] == config["feedback_token"] == "<redacted>"
    assert config["model"] == str(tiny_lm_path)  # the rest is kept: the run stays reproducible


class _RunsCode:
    """Unpickling this runs code: what a hostile file on the shared checkpoint volume would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code_from_the_checkpoint_volume(tmp_path, tiny_lm_path, sft_jsonl):
    run = tmp_path / "run"
    run_sft(sft_config(tiny_lm_path, sft_jsonl, run, max_steps=2, checkpoint_every=1))
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "code-ran"
    state = torch.load(latest / "trainer_state.pt", weights_only=True)
    torch.save({**state, "metrics": _RunsCode(marker)}, latest / "trainer_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        run_sft(sft_config(tiny_lm_path, sft_jsonl, run, max_steps=4, checkpoint_every=1, resume=True))
    assert not marker.exists()
