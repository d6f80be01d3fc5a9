"""The PolicyService in another process (`rlhf serve generation`) against the same model in-process."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.core.chat import encode_prompt
from rlhf.core.models import causal_lm_logits, load_causal_lm, load_tokenizer
from rlhf.generation.client import PolicyClient
from rlhf.v1 import common_pb2

from .conftest import metric, rpc_error, scrape, start_generation

PROMPTS = [
    "Hello, how are you today?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story about a cat."}],
    "Give me advice about learning to cook, please, my friend.",
    "hi",
]


@pytest.fixture(scope="module")
def service(launcher, peaked_lm_path):
    return start_generation(launcher, "policy", peaked_lm_path, "--max-batch-size", "32")


@pytest.fixture(scope="module")
def client(service):
    with PolicyClient(service.target, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(peaked_lm_path):
    return load_causal_lm(peaked_lm_path), load_tokenizer(peaked_lm_path)


def generate_in_process(model, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    tokens = out[0, len(ids) :].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def teacher_forced_logprobs(model, prompt_ids, response_ids, temperature: float) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = causal_lm_logits(model, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 : -1]
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    return logp.gather(-1, torch.tensor(list(response_ids))[:, None])[:, 0]


def test_greedy_through_the_service_equals_model_generate(client, reference):
    model, tok = reference
    samples = client.generate(PROMPTS, max_new_tokens=40, temperature=0.0)
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, 0) for i in range(len(PROMPTS))]
    for prompt, sample in zip(PROMPTS, samples, strict=True):
        ids = encode_prompt(tok, prompt)
        assert list(sample.prompt_token_ids) == ids
        expected = generate_in_process(model, ids, 40)
        assert list(sample.token_ids) == expected
        assert sample.text == tok.decode(expected, skip_special_tokens=True)
        eos = expected[-1] == tok.eos_token_id
        assert sample.finish_reason == (
            common_pb2.FINISH_REASON_STOP if eos else common_pb2.FINISH_REASON_LENGTH
        )
    # token-id prompts are used verbatim
    ids = encode_prompt(tok, "Tell a story")
    [sample] = client.generate([ids], max_new_tokens=12, temperature=0.0)
    assert list(sample.token_ids) == generate_in_process(model, ids, 12)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,mode",
    [
        (1.0, 0, 1.0, "temperature"),
        (0.7, 20, 0.9, "temperature"),
        (1.3, 0, 1.0, "sampling"),
        (0.0, 0, 1.0, "sampling"),
    ],
)
def test_sampled_logprobs_equal_a_teacher_forced_recompute(
    client, reference, temperature, top_k, top_p, mode
):
    model, tok = reference
    samples = client.generate(
        PROMPTS,
        max_new_tokens=24,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=7,
        n=2,
        logprobs_mode=mode,
    )
    assert len(samples) == 2 * len(PROMPTS)
    for s in samples:
        assert len(s.logprobs) == len(s.token_ids) > 0
        expected = teacher_forced_logprobs(model, s.prompt_token_ids, s.token_ids, temperature)
        assert torch.allclose(torch.tensor(list(s.logprobs)), expected, atol=1e-4), (s.logprobs, expected)


def test_sampling_mode_logprobs_are_those_of_the_truncated_distribution(client, reference):
    model, _ = reference
    [s] = client.generate(
        [PROMPTS[0]], max_new_tokens=16, temperature=0.8, top_k=5, seed=3, logprobs_mode="sampling"
    )
    ids = torch.tensor([list(s.prompt_token_ids) + list(s.token_ids)])
    logits = causal_lm_logits(model, ids, torch.ones_like(ids))[0, len(s.prompt_token_ids) - 1 : -1] / 0.8
    kth = torch.topk(logits, 5, dim=-1).values[:, -1:]
    truncated = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
    expected = truncated.gather(-1, torch.tensor(list(s.token_ids))[:, None])[:, 0]
    assert torch.allclose(torch.tensor(list(s.logprobs)), expected, atol=1e-4)
    assert all(lp > float("-inf") for lp in s.logprobs)


def test_a_seed_reproduces_samples_and_n_samples_differ(client):
    kw = dict(max_new_tokens=20, temperature=1.0, seed=11, n=3)
    first = client.generate(PROMPTS[:2], **kw)
    again = client.generate(PROMPTS[:2], **kw)
    assert [list(s.token_ids) for s in first] == [list(s.token_ids) for s in again]
    assert len({tuple(s.token_ids) for s in first[:3]}) > 1


def test_sixteen_concurrent_callers_share_batches_and_get_their_own_results(service, client):
    """Each caller has its own temperature, seed, length and top-k; results equal the same calls made alone."""

    def params(i):
        return dict(
            max_new_tokens=6 + i,
            temperature=0.0 if i % 4 == 0 else 0.5 + 0.1 * i,
            top_k=[0, 10, 50, 0][i % 4],
            seed=100 + i,
        )

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    before = scrape(service)
    results: dict[int, object] = {}
    barrier = threading.Barrier(16)

    def call(i):
        barrier.wait()
        results[i] = client.generate([prompts[i]], **params(i))[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = scrape(service)
    passes = metric(after, "rlhf_generation_batch_size_count") - metric(
        before, "rlhf_generation_batch_size_count"
    )
    rows = metric(after, "rlhf_generation_batch_size_sum") - metric(before, "rlhf_generation_batch_size_sum")
    shared = (
        metric(after, "rlhf_generation_batch_size_count")
        - metric(after, "rlhf_generation_batch_size_bucket", 'le="4.0"')
    ) - (
        metric(before, "rlhf_generation_batch_size_count")
        - metric(before, "rlhf_generation_batch_size_bucket", 'le="4.0"')
    )
    assert shared > 0, "no forward pass carried more than 4 sequences"
    assert rows / passes > 2, f"{rows} rows in {passes} forward passes"
    for i in range(16):
        sample = results[i]
        p = params(i)
        assert (
            len(sample.token_ids) == p["max_new_tokens"]
            or sample.finish_reason == common_pb2.FINISH_REASON_STOP
        )
        alone = client.generate([prompts[i]], **p)[0]
        assert list(alone.token_ids) == list(sample.token_ids)


def test_stop_strings_cut_the_text(client):
    [base] = client.generate([PROMPTS[0]], max_new_tokens=30, temperature=0.0)
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    [s] = client.generate([PROMPTS[0]], max_new_tokens=30, temperature=0.0, stop=[stop])
    assert s.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert s.text == text[: text.find(stop)]
    assert list(s.token_ids) == list(base.token_ids[: len(s.token_ids)])


def test_stream_carries_the_same_tokens_as_generate(client):
    kw = dict(max_new_tokens=15, temperature=0.9, seed=5, n=2)
    unary = client.generate(PROMPTS[:2], **kw)
    streamed: dict[tuple[int, int], list] = {}
    texts: dict[tuple[int, int], str] = {}
    finish = {}
    for message in client.generate_stream(PROMPTS[:2], **kw):
        key = (message.prompt_index, message.sample_index)
        streamed.setdefault(key, []).extend(message.token_ids)
        texts[key] = texts.get(key, "") + message.text
        if message.finish_reason:
            finish[key] = message.finish_reason
    for s in unary:
        key = (s.prompt_index, s.sample_index)
        assert streamed[key] == list(s.token_ids)
        assert texts[key] == s.text
        assert finish[key] == s.finish_reason


def test_model_info_and_min_policy_version(client, peaked_lm_path):
    info = client.model_info()
    assert info.backend == "torch" and info.version == "0" and info.vocab_size > 0
    assert info.max_batch_size == 32 and info.has_chat_template
    err = rpc_error(client.generate, ["hi"], max_new_tokens=2, min_policy_version=1)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "min_policy_version" in err.details()


def test_health_is_serving(service):
    with grpc.insecure_channel(service.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
