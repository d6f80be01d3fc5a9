"""The TGI backend behind the PolicyService contract, against a local server speaking TGI's HTTP schema."""

from __future__ import annotations

import grpc
import pytest
import torch

from rlhf.core.chat import encode_prompt, render_prompt
from rlhf.core.models import causal_lm_logits, load_causal_lm, load_tokenizer
from rlhf.generation.client import PolicyClient
from rlhf.v1 import common_pb2

from .conftest import rpc_error, start_generation
from .fake_tgi import FakeTGI

PROMPTS = ["Tell a story about a cat.", [{"role": "user", "content": "Hello, how are you?"}]]


@pytest.fixture(scope="module")
def model_and_tokenizer(peaked_lm_path):
    return load_causal_lm(peaked_lm_path), load_tokenizer(peaked_lm_path)


@pytest.fixture(scope="module")
def fake_tgi(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with FakeTGI(model, tok, max_new_tokens=64) as fake:
        yield fake


@pytest.fixture(scope="module")
def client(launcher, fake_tgi, peaked_lm_path):
    service = start_generation(
        launcher,
        "policy-tgi",
        peaked_lm_path,
        "--backend",
        "tgi",
        "--tgi-url",
        fake_tgi.url,
        "--tgi-timeout-seconds",
        "30",
    )
    with PolicyClient(service.target, timeout=60) as client:
        yield client


def teacher_forced(model, prompt_ids, response_ids, temperature=1.0):
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = causal_lm_logits(model, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, torch.tensor(list(response_ids))[:, None])[:, 0]


def test_greedy_through_tgi_equals_model_generate(client, fake_tgi, model_and_tokenizer):
    model, tok = model_and_tokenizer
    samples = client.generate(PROMPTS, max_new_tokens=20, temperature=0.0)
    for prompt, s in zip(PROMPTS, samples, strict=True):
        ids = encode_prompt(tok, prompt)
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
        )
        expected = out[0, len(ids) :].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id) + 1]
        assert list(s.token_ids) == expected
        assert list(s.prompt_token_ids) == ids
        assert torch.allclose(torch.tensor(list(s.logprobs)), teacher_forced(model, ids, expected), atol=1e-4)
        assert s.policy_version == 0
    # the rendered chat prompt went to TGI as text, with details requested
    sent = [r["inputs"] for r in fake_tgi.requests[-2:]]
    assert sorted(sent) == sorted(render_prompt(tok, p) for p in PROMPTS)
    assert all(r["parameters"]["details"] for r in fake_tgi.requests[-2:])


def test_sampled_logprobs_and_seeds(client, model_and_tokenizer):
    model, tok = model_and_tokenizer
    kw = dict(max_new_tokens=12, temperature=0.8, seed=4, n=2, logprobs_mode="sampling")
    samples = client.generate(PROMPTS[:1], **kw)
    assert [s.sample_index for s in samples] == [0, 1]
    assert samples[0].token_ids != samples[1].token_ids
    again = client.generate(PROMPTS[:1], **kw)
    assert [list(s.token_ids) for s in again] == [list(s.token_ids) for s in samples]
    for s in samples:  # without truncation, sampling == temperature logprobs
        expected = teacher_forced(model, s.prompt_token_ids, s.token_ids, 0.8)
        assert torch.allclose(torch.tensor(list(s.logprobs)), expected, atol=1e-4)


def test_stop_strings_and_streaming(client):
    [base] = client.generate(PROMPTS[:1], max_new_tokens=30, temperature=0.0)
    stop = base.text[4:7]
    [s] = client.generate(PROMPTS[:1], max_new_tokens=30, temperature=0.0, stop=[stop])
    assert s.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert s.text == base.text[: base.text.find(stop)]
    tokens, text, finish = [], "", None
    for message in client.generate_stream(PROMPTS[:1], max_new_tokens=30, temperature=0.0):
        tokens += message.token_ids
        text += message.text
        finish = message.finish_reason or finish
    assert tokens == list(base.token_ids) and text == base.text and finish == base.finish_reason


def test_tgi_statuses(client, fake_tgi):
    err = rpc_error(client.update_weights, version=1, checkpoint_path="/dev/shm/x.safetensors")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "tgi backend" in err.details()
    err = rpc_error(
        client.generate, ["hi"], max_new_tokens=5, temperature=0.7, top_k=5, logprobs_mode="temperature"
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and err.details().startswith(
        "params.logprobs_mode"
    )
    err = rpc_error(client.generate, ["hi"], max_new_tokens=100)  # the fake TGI accepts at most 64
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in err.details()
    fake_tgi.overloaded = True
    try:
        client.retry.retry_timeout = 0
        err = rpc_error(client.generate, ["hi"], max_new_tokens=5)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        fake_tgi.overloaded = False
    info = client.model_info()
    assert info.backend == "tgi" and info.source == fake_tgi.url and info.name == "fake/tiny-llama"
