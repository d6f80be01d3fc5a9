"""The forwards on a rollout: padded batches and the shared-prefix forward."""

from __future__ import annotations

import torch

from rlhf.core.models import causal_lm_logits, load_causal_lm, load_tokenizer
from rlhf.rl.forward import ValueHead, reference_logprobs, response_forward
from rlhf.rl.math import logprobs_from_logits
from rlhf.rl.rollout import MIN_SHARED_PREFIX

TEMPERATURE = 0.7


def test_response_forward_of_a_padded_batch_matches_each_row_alone(tiny, make_rollout):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = [[1, 20, 21, 22, 23, 24], [1, 30]]
    responses = [[40, 41, eos], [50, 51, 52, 53, 54]]
    r = make_rollout(tok, prompts, responses)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        out = response_forward(model, r, None, TEMPERATURE, head)
        for row, (p, resp) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([p + resp])
            logits = causal_lm_logits(model, ids, torch.ones_like(ids))[:, len(p) - 1 : -1]
            expected = logprobs_from_logits(logits, torch.tensor([resp]), TEMPERATURE)[0]
            torch.testing.assert_close(out.logprobs[row, : len(resp)], expected, atol=1e-5, rtol=1e-5)
            hidden = model.base_model(input_ids=ids).last_hidden_state[0, len(p) - 1 : -1]
            torch.testing.assert_close(out.values[row, : len(resp)], head(hidden), atol=1e-5, rtol=1e-5)
        ref = reference_logprobs(model, r, TEMPERATURE, micro_batch_size=1)
    torch.testing.assert_close(ref, out.logprobs.masked_fill(~r.mask, 0.0), atol=1e-5, rtol=1e-5)


def test_the_shared_prefix_forward_equals_the_full_forward_with_gradients(tiny_lm_path, make_rollout):
    model = load_causal_lm(tiny_lm_path)
    tok = load_tokenizer(tiny_lm_path)
    eos = tok.eos_token_id
    system = list(range(30, 30 + MIN_SHARED_PREFIX + 4))
    prompts = [system + [20, 21, 22], system + [23], system + [24, 25]]
    responses = [[40, 41, eos], [50, 51, 52, 53], [60]]
    shared = make_rollout(tok, prompts, responses)
    full = make_rollout(tok, prompts, responses, share_prefix=False)
    assert shared.prefix_length == len(system) and full.prefix_length == 0
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    results = []
    for rollout in (shared, full):
        model.zero_grad()
        head.zero_grad()
        out = response_forward(model, rollout, torch.tensor([2, 0, 1]), TEMPERATURE, head)
        mask = rollout.mask[[2, 0, 1]]
        loss = (out.logprobs * mask).sum() + (out.values * mask).sum()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out.logprobs * mask, out.values * mask, grads, head.summary.weight.grad.clone()))
    (lp_s, v_s, g_s, h_s), (lp_f, v_f, g_f, h_f) = results
    torch.testing.assert_close(lp_s, lp_f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_s, v_f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h_s, h_f, atol=1e-4, rtol=1e-4)
    assert len(g_s) == len(g_f)
    for a, b in zip(g_s, g_f, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
