"""Over a thousand malformed requests (hypothesis): each gets a clear status naming the field, the server stays
SERVING and keeps scoring."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc

from .conftest import running_server

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
FIELD_PREFIXES = ("items", "truncation", "request", "path", "version")
SETTINGS = dict(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

texts = st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=190, max_size=260))
roles = st.sampled_from(["user", "assistant", "system", "", "USER", "tool", "robot"])
messages = st.lists(st.builds(common_pb2.ChatMessage, role=roles, content=texts), max_size=4)
prompts = st.one_of(
    st.builds(common_pb2.Prompt),
    st.builds(lambda t: common_pb2.Prompt(text=t), texts),
    st.builds(lambda m: common_pb2.Prompt(chat=common_pb2.Conversation(messages=m)), messages),
    st.builds(
        lambda ids: common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=ids)),
        st.lists(st.integers(0, 2**32 - 1), max_size=5),
    ),
)
items = st.one_of(
    st.builds(reward_pb2.ScoreItem),
    st.builds(
        lambda p, r: reward_pb2.ScoreItem(pair=reward_pb2.PromptResponse(prompt=p, response=r)),
        prompts,
        texts,
    ),
    st.builds(lambda m: reward_pb2.ScoreItem(conversation=common_pb2.Conversation(messages=m)), messages),
)
requests = st.builds(
    lambda its, many, trunc: reward_pb2.ScoreRequest(items=its * (40 if many else 1), truncation=trunc),
    st.lists(items, max_size=4),
    st.booleans(),
    st.integers(-3, 7),
)


@pytest.fixture(scope="module")
def server(rm_with_stats, tmp_path_factory):
    roots = tmp_path_factory.mktemp("no-models-here")
    with running_server(
        rm_with_stats,
        max_wait_ms=0,
        max_pairs_per_request=100,
        max_text_chars=200,
        max_tokens=64,
        model_roots=[str(roots)],
    ) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def check(call, request, counter):
    counter.append(1)
    try:
        call(request, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details(), request)
        assert exc.details().startswith(FIELD_PREFIXES), exc.details()
        return exc.code()


def test_a_thousand_malformed_requests(server, channel):
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    raw = {
        name: channel.unary_unary(f"/rlhf.v1.RewardService/{name}")
        for name in ("Score", "LoadModel", "GetModelInfo")
    }
    sent: list = []
    codes: list = []

    @settings(max_examples=700, **SETTINGS)
    @given(requests)
    def structured(request):
        codes.append(check(stub.Score, request, sent))

    @settings(max_examples=250, **SETTINGS)
    @given(st.sampled_from(sorted(raw)), st.binary(max_size=120))
    def raw_bytes(method, data):
        check(raw[method], data, sent)

    @settings(max_examples=100, **SETTINGS)
    @given(st.text(max_size=60), st.text(max_size=300))
    def load_paths(path, version):
        check(stub.LoadModel, reward_pb2.LoadModelRequest(path=path, version=version), sent)

    structured()
    raw_bytes()
    load_paths()
    assert len(sent) >= 1000
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) > 100  # mostly malformed, as intended
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with server.client() as client:
        assert client.model_info().version == "tiny-v1"
        assert len(client.score([("Hello", "Hi!")])) == 1
