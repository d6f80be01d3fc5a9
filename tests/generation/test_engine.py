"""The batching engine stepped by hand (no thread): continuous batching, row pruning, swaps, cancellation."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rlhf.core.chat import encode_prompt
from rlhf.core.errors import ResourceExhausted
from rlhf.core.models import load_causal_lm, load_tokenizer
from rlhf.generation.engine import Engine
from rlhf.generation.requests import CANCELLED, LENGTH, EngineRequest
from rlhf.generation.sampling import SamplingParams


@pytest.fixture(scope="module")
def parts(peaked_lm_path):
    return load_causal_lm(peaked_lm_path), load_tokenizer(peaked_lm_path)


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_engine(parts, **kw):
    model, tok = parts
    return Engine(model, tok, batch_wait_ms=0, **{"max_batch_size": 8, **kw})


def step(engine, times=1):
    with torch.inference_mode():
        for _ in range(times):
            engine._step()


def run_until_done(engine, *requests, limit=500):
    for _ in range(limit):
        if all(r.done for r in requests):
            return
        step(engine)
    raise AssertionError("requests did not finish")


def alone(parts, loop, prompt_ids, params):
    engine = make_engine(parts)
    request = engine.submit(EngineRequest([prompt_ids], params, loop=loop))
    run_until_done(engine, request)
    return request.sequences[0]


def test_a_request_joining_mid_flight_gets_the_same_tokens_as_alone(parts, loop):
    _, tok = parts
    long_ids = encode_prompt(tok, "Tell a story about a cat who lives in a big city with many friends.")
    short_ids = encode_prompt(tok, "hi")
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=40, seed=3)
    engine = make_engine(parts)
    a = engine.submit(EngineRequest([short_ids], greedy, loop=loop))
    step(engine, 5)
    assert len(engine._rows) == 1
    b = engine.submit(EngineRequest([long_ids], sampled, loop=loop))
    step(engine)  # b's prompt is prefilled and its cache merged into the running batch
    assert len(engine._rows) == 2 and engine._cache.layers[0].keys.shape[0] == 2
    run_until_done(engine, b)
    # b finished first and left: one row, and the cache columns only b's longer prompt used are cut
    assert len(engine._rows) == 1 and engine._cache.layers[0].keys.shape[0] == 1
    assert engine._mask.shape[1] == len(short_ids) + len(a.sequences[0].token_ids) - 1
    assert bool(engine._mask.all())
    run_until_done(engine, a)
    assert engine._rows == [] and engine._cache is None
    assert a.sequences[0].token_ids == alone(parts, loop, short_ids, greedy).token_ids
    assert b.sequences[0].token_ids == alone(parts, loop, long_ids, sampled).token_ids
    assert b.sequences[0].finish_reason == LENGTH and len(b.sequences[0].token_ids) == 8


def test_identical_prompts_are_prefilled_once_and_sampled_separately(parts, loop):
    _, tok = parts
    ids = encode_prompt(tok, "Tell a story")
    engine = make_engine(parts)
    request = engine.submit(
        EngineRequest([ids], SamplingParams(max_new_tokens=10, temperature=1.0, n=4, seed=1), loop=loop)
    )
    step(engine)
    assert len(engine._rows) == 4
    run_until_done(engine, request)
    tokens = [s.token_ids for s in request.sequences]
    assert len({tuple(t) for t in tokens}) > 1
    other = make_engine(parts)
    again = other.submit(
        EngineRequest([ids], SamplingParams(max_new_tokens=10, temperature=1.0, n=4, seed=1), loop=loop)
    )
    run_until_done(other, again)
    assert [s.token_ids for s in again.sequences] == tokens


def test_a_swap_waits_for_the_running_batch_and_new_requests_wait_for_the_swap(parts, loop, tiny_lm_path):
    model, tok = parts
    original = {k: v.clone() for k, v in model.state_dict().items()}
    other = load_causal_lm(tiny_lm_path).state_dict()
    ids = encode_prompt(tok, "hi")
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    try:
        engine = make_engine(parts)
        first = engine.submit(EngineRequest([ids], params, loop=loop))
        step(engine, 3)
        future = engine.request_swap({k: other[k] for k in other if k != "lm_head.weight"}, 1)
        second = engine.submit(EngineRequest([ids], params, loop=loop))
        step(engine, 3)
        assert not future.done() and len(engine._waiting) == 1  # first still runs on version 0
        run_until_done(engine, first)
        step(engine)  # the swap
        assert future.result(timeout=0) == 1 and engine.policy_version == 1
        run_until_done(engine, second)
        assert first.policy_version == 0 and second.policy_version == 1
        assert second.sequences[0].token_ids != first.sequences[0].token_ids
        assert torch.equal(model.lm_head.weight, other["model.embed_tokens.weight"])  # tied: swapped together
    finally:
        model.load_state_dict(original)


def test_cancelled_and_expired_requests_leave_the_batch(parts, loop):
    _, tok = parts
    ids = encode_prompt(tok, "hi")
    engine = make_engine(parts)
    params = SamplingParams(max_new_tokens=100, temperature=0.0)
    a = engine.submit(EngineRequest([ids], params, loop=loop))
    b = engine.submit(EngineRequest([ids], params, loop=loop, deadline=0.0))  # already expired
    step(engine, 2)
    assert b.done and b.sequences[0].finish_reason == CANCELLED
    a.cancel()
    step(engine)
    assert a.done and a.sequences[0].finish_reason == CANCELLED and engine._rows == []
    assert len(a.sequences[0].token_ids) < 100


def test_the_queue_is_bounded(parts, loop):
    _, tok = parts
    ids = encode_prompt(tok, "hi")
    engine = make_engine(parts, max_batch_size=1, max_queue=1)
    params = SamplingParams(max_new_tokens=50, temperature=0.0)
    engine.submit(EngineRequest([ids], params, loop=loop))
    step(engine)
    engine.submit(EngineRequest([ids], params, loop=loop))
    with pytest.raises(ResourceExhausted, match="queue full"):
        engine.submit(EngineRequest([ids], params, loop=loop))
