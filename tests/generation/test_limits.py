"""Backpressure, deadlines, cancellation and malformed input: clear statuses, and the server keeps SERVING."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from .conftest import metric, rpc_error, scrape, start_generation

FIELDS = ("prompts", "params.", "min_policy_version", "request_id")


def greedy_request(text="Tell a story", max_new_tokens=100, **kw):
    return policy_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=text)],
        params=policy_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        **kw,
    )


@pytest.fixture(scope="module")
def small(launcher, tiny_lm_path):
    """One sequence at a time, two may wait: easy to fill. tiny_lm_path's greedy output never hits EOS."""
    return start_generation(
        launcher,
        "policy-small",
        tiny_lm_path,
        "--max-batch-size",
        "1",
        "--max-queue",
        "2",
        "--max-prompt-tokens",
        "64",
        "--max-new-tokens-limit",
        "400",
    )


@pytest.fixture(scope="module")
def stub(small):
    with grpc.insecure_channel(small.target) as channel:
        yield policy_pb2_grpc.PolicyServiceStub(channel)


def wait_until(condition, timeout=60.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def test_a_full_queue_answers_resource_exhausted(small, stub):
    before = metric(scrape(small), "rlhf_generation_requests_rejected_total", 'reason="queue_full"')
    calls = [stub.Generate.future(greedy_request(max_new_tokens=100), timeout=120) for _ in range(30)]
    codes = []
    for call in calls:
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "queue full" in exc.details()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    after = metric(scrape(small), "rlhf_generation_requests_rejected_total", 'reason="queue_full"')
    assert after - before == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_limits_answer_invalid_argument_naming_the_field(stub):
    cases = [
        (greedy_request(max_new_tokens=401), "params.max_new_tokens: 401 > limit 400"),
        (greedy_request(text="cat " * 200), "prompts[0]: "),
        (
            policy_pb2.GenerateRequest(
                prompts=[common_pb2.Prompt(text="a"), common_pb2.Prompt(text="b")],
                params=policy_pb2.SamplingParams(max_new_tokens=2),
            ),
            "prompts: 2 prompts x n=1 = 2 sequences > max_batch_size 1",
        ),
        (policy_pb2.GenerateRequest(params=policy_pb2.SamplingParams(max_new_tokens=2)), "prompts: "),
    ]
    for request, prefix in cases:
        err = rpc_error(stub.Generate, request, timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith(prefix), err.details()


def test_an_expired_request_leaves_the_batch(small, stub):
    before = metric(scrape(small), "rlhf_generation_generation_tokens_total")
    # 400 tokens (this server's limit) take well over the 0.15 s deadline, even on a fast idle machine
    err = rpc_error(stub.Generate, greedy_request(max_new_tokens=400), timeout=0.15)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: metric(scrape(small), "rlhf_generation_num_requests_running") == 0)
    generated = metric(scrape(small), "rlhf_generation_generation_tokens_total") - before
    assert generated < 400
    assert len(stub.Generate(greedy_request(max_new_tokens=3), timeout=30).samples[0].token_ids) == 3


def test_a_cancelled_stream_leaves_the_batch(small, stub):
    before = metric(scrape(small), "rlhf_generation_generation_tokens_total")
    request = policy_pb2.GenerateStreamRequest(
        prompts=[common_pb2.Prompt(text="hi")],
        params=policy_pb2.SamplingParams(max_new_tokens=400, temperature=0),
    )
    call = stub.GenerateStream(request, timeout=120)
    first = next(call)
    assert len(first.token_ids) >= 1
    call.cancel()
    wait_until(lambda: metric(scrape(small), "rlhf_generation_num_requests_running") == 0)
    assert metric(scrape(small), "rlhf_generation_generation_tokens_total") - before < 400


# ---- fuzzing ---------------------------------------------------------------------------------------------

roles = st.sampled_from(["user", "system", "assistant", "", "bot", "USER"])
messages = st.builds(common_pb2.ChatMessage, role=roles, content=st.text(max_size=40))
prompts = st.one_of(
    st.builds(common_pb2.Prompt),
    st.builds(common_pb2.Prompt, text=st.text(max_size=120)),
    st.builds(
        common_pb2.Prompt, chat=st.builds(common_pb2.Conversation, messages=st.lists(messages, max_size=3))
    ),
    st.builds(
        common_pb2.Prompt,
        tokens=st.builds(common_pb2.TokenIds, ids=st.lists(st.integers(0, 2**32 - 1), max_size=8)),
    ),
)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def sampling_params(draw):
    params = policy_pb2.SamplingParams(
        max_new_tokens=draw(st.integers(0, 2**32 - 1) | st.integers(0, 4)),
        top_p=draw(floats),
        top_k=draw(st.integers(0, 2**32 - 1)),
        stop=draw(st.lists(st.text(max_size=80), max_size=10)),
        n=draw(st.integers(0, 100) | st.integers(0, 2)),
        logprobs_mode=draw(st.integers(0, 6)),
    )
    if draw(st.booleans()):
        params.temperature = draw(floats)
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    return params


requests = st.builds(
    policy_pb2.GenerateRequest,
    prompts=st.lists(prompts, max_size=3),
    params=sampling_params(),
    min_policy_version=st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 2),
    request_id=st.text(max_size=300),
)


@pytest.fixture(scope="module")
def fuzz_target(launcher, tiny_lm_path):
    return start_generation(
        launcher,
        "policy-fuzz",
        tiny_lm_path,
        "--max-batch-size",
        "8",
        "--max-new-tokens-limit",
        "4",
        "--max-prompt-tokens",
        "64",
    )


@pytest.mark.slow
def test_a_thousand_malformed_requests_get_clear_statuses_and_the_server_stays_serving(fuzz_target):
    channel = grpc.insecure_channel(fuzz_target.target)
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    tally = {"malformed": 0, "ok": 0}

    @settings(max_examples=1300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests)
    def check(request):
        try:
            response = stub.Generate(request, timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (
                exc.code(),
                exc.details(),
            )
            assert exc.details().startswith(FIELDS), exc.details()
            tally["malformed"] += 1
            return
        tally["ok"] += 1
        n = request.params.n or 1
        assert len(response.samples) == len(request.prompts) * n
        for s in response.samples:
            assert len(s.logprobs) == len(s.token_ids) and all(
                lp <= 0 and math.isfinite(lp) for lp in s.logprobs
            )

    check()
    assert tally["malformed"] >= 1000, tally
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert len(stub.Generate(greedy_request(max_new_tokens=3), timeout=30).samples[0].token_ids) == 3
    assert fuzz_target.alive()
    channel.close()
