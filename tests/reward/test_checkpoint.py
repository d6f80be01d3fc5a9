"""The reward checkpoint format: what the RM trainer writes and the reward service reads."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.core.models import load_reward_model, load_tokenizer, reward_forward
from rlhf.reward.checkpoint import METADATA_FILE, read_reward_metadata, save_reward_checkpoint


def test_round_trip(tiny_rm_path, tmp_path):
    model = load_reward_model(tiny_rm_path)
    tok = load_tokenizer(tiny_rm_path)
    out = save_reward_checkpoint(
        model, tok, tmp_path / "rm", reward_mean=0.5, reward_std=2.0, extra={"eval_accuracy": 0.75}
    )
    meta = read_reward_metadata(out)
    assert meta["reward_mean"] == 0.5 and meta["reward_std"] == 2.0 and meta["eval_accuracy"] == 0.75
    assert meta["version"].startswith("rm-")
    again = load_reward_model(out)
    ids = torch.tensor([tok("hello there")["input_ids"]])
    mask = torch.ones_like(ids)
    assert torch.allclose(reward_forward(model, ids, mask), reward_forward(again, ids, mask))


def test_explicit_version_and_plain_folder(tiny_rm_path, tmp_path):
    model = load_reward_model(tiny_rm_path)
    tok = load_tokenizer(tiny_rm_path)
    out = save_reward_checkpoint(model, tok, tmp_path / "x", reward_mean=0, reward_std=1, version="v7")
    assert read_reward_metadata(out)["version"] == "v7"
    plain = read_reward_metadata(tiny_rm_path)  # no metadata file: still usable, no statistics
    assert plain["reward_mean"] is None and plain["reward_std"] is None and plain["version"]


def test_rejects_bad_input(tiny_rm_path, tmp_path):
    model = load_reward_model(tiny_rm_path)
    tok = load_tokenizer(tiny_rm_path)
    with pytest.raises(ValueError, match="reward_std"):
        save_reward_checkpoint(model, tok, tmp_path / "a", reward_mean=0, reward_std=float("nan"))
    with pytest.raises(ValueError, match="extra"):
        save_reward_checkpoint(
            model, tok, tmp_path / "b", reward_mean=0, reward_std=1, extra={"version": "x"}
        )
    with pytest.raises(FileNotFoundError):
        read_reward_metadata(tmp_path / "nothing")
    out = save_reward_checkpoint(model, tok, tmp_path / "c", reward_mean=0, reward_std=1)
    (out / METADATA_FILE).write_text(json.dumps({"reward_mean": "high"}))
    with pytest.raises(ValueError, match="reward_mean"):
        read_reward_metadata(out)
