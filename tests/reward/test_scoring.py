"""Encoding, truncation, batch planning and batched scoring, without a server."""

from __future__ import annotations

import pytest
import torch

from rlhf.core import chat
from rlhf.core.errors import InvalidArgument
from rlhf.core.models import common_prefix_length, reward_forward
from rlhf.reward import scoring
from rlhf.reward.batcher import plan_batches
from rlhf.reward.client import make_item

PAIRS = [
    ("Hello", "Hi!"),
    ("Write a short review of a restaurant.", "The food was cold and everyone was angry, a bad day."),
    (
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell a story about a cat."}],
        "No.",
    ),
    ("What a bad day", ""),
]


@pytest.fixture(scope="module")
def loaded(tiny_rm_path):
    return scoring.load_model(tiny_rm_path)


def single_forward(loaded, ids):
    t = torch.tensor([ids])
    with torch.inference_mode():
        return reward_forward(loaded.model, t, torch.ones_like(t)).item()


def test_encoding_is_the_trainers_formatting(loaded):
    for prompt, response in PAIRS:
        p, r = chat.tokenize_prompt_response(loaded.tokenizer, prompt, response)
        enc = scoring.encode_pair(loaded.tokenizer, prompt, response, max_tokens=1000, truncation="reject")
        assert enc.ids == p + r and not enc.truncated
        assert enc.ids[-1] == loaded.tokenizer.eos_token_id


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_scores_equal_single_unpadded_forward(loaded, side):
    seqs = [
        scoring.encode_pair(loaded.tokenizer, p, r, max_tokens=1000, truncation="reject").ids
        for p, r in PAIRS
    ]
    assert len({len(s) for s in seqs}) > 1  # real padding in the batch
    batched = scoring.score_sequences(loaded, seqs, padding_side=side)
    for seq, score in zip(seqs, batched, strict=True):
        assert score == pytest.approx(single_forward(loaded, seq), abs=1e-5)


def test_truncation_policies(loaded):
    tok = loaded.tokenizer
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    p, r = chat.tokenize_prompt_response(tok, prompt, "I love it")
    limit = len(r) + 10
    with pytest.raises(InvalidArgument) as err:
        scoring.encode_pair(
            tok, prompt, "I love it", max_tokens=limit, truncation="reject", field_name="items[2]"
        )
    assert err.value.field == "items[2]" and f"{len(p) + len(r)} tokens > limit {limit}" in err.value.why
    enc = scoring.encode_pair(tok, prompt, "I love it", max_tokens=limit, truncation="truncate_left")
    assert enc.truncated and enc.ids == p[-10:] + r and len(enc.ids) == limit
    with pytest.raises(InvalidArgument, match="no room for the prompt"):
        scoring.encode_pair(tok, "hi", "I love it " * 50, max_tokens=limit, truncation="truncate_left")


@pytest.mark.parametrize(
    "item, field, why",
    [
        ({"prompt": "", "response": "x"}, "items[0].pair.prompt.text", "empty"),
        ([{"role": "user", "content": "a"}], "items[0].conversation.messages", "must end with an assistant"),
        (
            [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}],
            "items[0].conversation.messages[0].role",
            "'robot' is not one of",
        ),
        (([{"role": "user", "content": ""}], "r"), "items[0].pair.prompt.chat.messages[0].content", "empty"),
        (("x" * 101, "r"), "items[0].pair.prompt.text", "101 chars > limit 100"),
        (("p", "r" * 101), "items[0].pair.response", "101 chars > limit 100"),
    ],
)
def test_bad_items_name_the_field(loaded, item, field, why):
    with pytest.raises(InvalidArgument) as err:
        scoring.encode_request(loaded, [make_item(item)], truncation="reject", max_chars=100)
    assert err.value.field == field and why in err.value.why


def test_token_prompts_and_empty_items_are_refused(loaded):
    from rlhf.v1 import common_pb2, reward_pb2

    tokens = reward_pb2.ScoreItem(
        pair=reward_pb2.PromptResponse(prompt=common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=[1])))
    )
    for item, field in [
        (tokens, "items[0].pair.prompt.tokens"),
        (reward_pb2.ScoreItem(), "items[0]"),
        (reward_pb2.ScoreItem(pair=reward_pb2.PromptResponse(response="r")), "items[0].pair.prompt"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            scoring.encode_request(loaded, [item], truncation="reject", max_chars=100)
        assert err.value.field == field


def test_plan_batches_sorts_by_length_and_respects_limits():
    lengths = [50, 3, 40, 4, 41, 5, 200]
    batches = plan_batches(lengths, max_batch_size=2, max_batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == [[1, 3], [5, 2], [4, 0], [6]]
    for b in batches:
        assert len(b) <= 2
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100


def test_load_model_rejects_non_reward_folders(tiny_lm_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        scoring.load_model(tmp_path)
    with pytest.raises(ValueError, match="labels"):
        scoring.load_model(tiny_lm_path)  # a causal LM: transformers gives it 2 labels


def test_shared_prefix_batches_equal_single_unpadded_forward(loaded):
    """One prompt, several responses (and PAIRS, whose rows share only the template's opening): the prefix runs
    once and its cache is reused, and every score still matches the plain forward pass."""
    assert loaded.prefix_sharing  # the trial at load time kept it on for this Llama model
    prompt = "Write a short review of a restaurant. Tell me about the food and the people there."
    responses = [
        "Great!",
        "The food was cold and everyone was angry, a bad day.",
        "I love it",
        "Bad day. " * 5,
    ]
    same_prompt = [sum(chat.tokenize_prompt_response(loaded.tokenizer, prompt, r), []) for r in responses]
    mixed = [sum(chat.tokenize_prompt_response(loaded.tokenizer, p, r), []) for p, r in PAIRS]
    assert common_prefix_length(same_prompt, own=1) > 16 and common_prefix_length(mixed, own=1) >= 1
    for seqs in (same_prompt, mixed):
        shared = scoring.score_sequences(loaded, seqs, min_shared_prefix=1)
        for seq, score in zip(seqs, shared, strict=True):
            assert score == pytest.approx(single_forward(loaded, seq), abs=1e-5)


def test_common_prefix_leaves_every_row_a_token():
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]], own=1) == 2
    assert common_prefix_length([[1, 2], [1, 3]], own=1) == 1
    assert common_prefix_length([[5], [5, 6]], own=1) == 0
