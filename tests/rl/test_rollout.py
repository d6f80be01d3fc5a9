"""A rollout as tensors: padding and the shared prompt prefix."""

from __future__ import annotations

import pytest

from rlhf.core.models import common_prefix_length


def test_build_rollout_left_pads_prompts_and_right_pads_responses(tiny, make_rollout):
    _, tok = tiny
    pad, eos = tok.pad_token_id, tok.eos_token_id
    r = make_rollout(tok, [[5, 6, 7], [8]], [[10, eos], [11, 12, 13]], [[-0.5, -0.25], [-1.0, -2.0, -3.0]])
    assert r.context_length == 3
    assert r.input_ids.tolist() == [[5, 6, 7, 10, eos, pad], [pad, pad, 8, 11, 12, 13]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert r.responses.tolist() == [[10, eos, pad], [11, 12, 13]]
    assert r.mask.tolist() == [[True, True, False], [True, True, True]]
    assert r.gen_logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]]
    assert r.ended_with_eos.tolist() == [True, False]
    with pytest.raises(ValueError, match="logprobs"):
        make_rollout(tok, [[5]], [[10, 11]], [[-1.0]])
    with pytest.raises(ValueError, match="at least one token"):
        make_rollout(tok, [[5]], [[]], [[]], eos=[False])


def test_a_common_prompt_prefix_stays_in_front_with_the_padding_after_it(tiny, make_rollout):
    _, tok = tiny
    pad = tok.pad_token_id
    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    r = make_rollout(tok, [[1, 2, 3, 4], [1, 2, 9]], [[7], [8]], eos=[False, False])
    assert r.prefix_length == 2
    assert r.input_ids.tolist() == [[1, 2, 3, 4, 7], [1, 2, pad, 9, 8]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]]
    # a prompt that is all prefix keeps its last token as its own
    assert make_rollout(tok, [[1, 2, 3], [1, 2, 3, 4]], [[7], [8]], eos=[False, False]).prefix_length == 2
