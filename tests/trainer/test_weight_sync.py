"""Weight sync without a service: the tensors a push sends."""

from __future__ import annotations

from rlhf.core.models import load_causal_lm
from rlhf.trainer.weight_sync import policy_state_dict


def test_policy_state_dict_drops_tied_duplicates(tiny_lm_path):
    model = load_causal_lm(tiny_lm_path)
    state = policy_state_dict(model)
    assert model.config.tie_word_embeddings
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert len(state) == len(model.state_dict()) - 1
