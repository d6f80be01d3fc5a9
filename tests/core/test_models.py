"""Shared model helpers: tiny models, padding-independent reward pooling, chat formatting."""

from __future__ import annotations

import torch

from rlhf.core import chat
from rlhf.core.models import (
    causal_lm_logits,
    is_default_model,
    last_real_token_index,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    position_ids_from_mask,
    resolve_model_path,
    reward_forward,
)


def _pad(rows, pad_id, side):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad_id] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        m = [0] * (width - len(r))
        mask.append(m + [1] * len(r) if side == "left" else [1] * len(r) + m)
    return torch.tensor(ids), torch.tensor(mask)


def test_position_ids_and_last_index_ignore_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    assert last_real_token_index(mask).tolist() == [4, 2, 4]


def test_reward_is_the_same_with_left_right_and_no_padding(tiny_rm_path):
    model = load_reward_model(tiny_rm_path)
    tok = load_tokenizer(tiny_rm_path)
    rows = [
        sum(chat.tokenize_prompt_response(tok, p, r), [])
        for p, r in [
            ("Tell a story", "The cat was happy."),
            ("Hi", "Hello!"),
            ("Write a review of a long movie", "Bad."),
        ]
    ]
    singles = torch.cat(
        [reward_forward(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows]
    )
    with torch.no_grad():
        for side in ("left", "right"):
            ids, mask = _pad(rows, tok.pad_token_id, side)
            torch.testing.assert_close(reward_forward(model, ids, mask), singles, atol=1e-5, rtol=0)
    assert singles.std() > 0  # a random head does not give every text the same score


def test_causal_logits_do_not_depend_on_left_padding(tiny_lm_path):
    model = load_causal_lm(tiny_lm_path)
    row = [5, 9, 17, 33, 2]
    ids, mask = _pad([row, [7, 8]], 0, "left")
    with torch.no_grad():
        alone = causal_lm_logits(model, torch.tensor([row]), torch.ones(1, 5, dtype=torch.long))
        padded = causal_lm_logits(model, ids, mask)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


def test_chat_formatting_ends_prompt_with_assistant_turn_and_response_with_eos(tiny_lm_path):
    tok = load_tokenizer(tiny_lm_path)
    text = chat.render_prompt(tok, "Hello there")
    assert text == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids, response_ids = chat.tokenize_prompt_response(tok, "Hello there", "Hi!")
    assert tok.decode(prompt_ids) == text
    assert response_ids[-1] == tok.eos_token_id
    assert chat.strip_response(tok, response_ids) == "Hi!"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert chat.split_conversation(messages) == ([{"role": "user", "content": "a"}], "b")


def test_default_model_aliases(tmp_path):
    assert (
        is_default_model(None) and is_default_model("default") and is_default_model("SmolLM2-135M-Instruct")
    )
    assert not is_default_model(str(tmp_path))
    try:
        resolve_model_path(tmp_path)
    except FileNotFoundError as e:
        assert "config.json" in str(e)
    else:
        raise AssertionError("a folder without config.json is not a model")
