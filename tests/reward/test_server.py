"""The RewardService over gRPC: scores equal the in-process forward, micro-batching, truncation, hot swap,
auth and TLS, malformed requests, metrics."""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.core import chat
from rlhf.core.client import RetryPolicy, make_channel
from rlhf.core.models import load_reward_model, load_tokenizer, reward_forward
from rlhf.reward.client import RewardClient

from .conftest import running_server

PAIRS = [
    ("Hello", "Hi!"),
    ("Write a short review of a restaurant.", "The food was cold and everyone was angry."),
    (
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell a story about a cat."}],
        "No.",
    ),
    ("What a bad day", ""),
    ("Give me advice about learning to cook.", "Start with eggs. " * 6),
    ("Hello, how are you today?", "I am happy, excited and grateful."),
]


class Reference:
    """The same reward model in this process: one unpadded forward per pair."""

    def __init__(self, folder):
        self.model = load_reward_model(folder)
        self.tok = load_tokenizer(folder)

    def ids(self, prompt, response):
        p, r = chat.tokenize_prompt_response(self.tok, prompt, response)
        return p + r

    def score_ids(self, ids):
        t = torch.tensor([ids])
        with torch.inference_mode():
            return reward_forward(self.model, t, torch.ones_like(t)).item()

    def score(self, prompt, response):
        return self.score_ids(self.ids(prompt, response))


@pytest.fixture(scope="module")
def ref(rm_with_stats):
    return Reference(rm_with_stats)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def health(target, **kw) -> int:
    with make_channel(target, **kw) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_single_pair_score_equals_in_process_forward(client, ref):
    for prompt, response in PAIRS:
        res = client.score_detailed([(prompt, response)])
        assert res.model_version == "tiny-v1"
        (result,) = res.results
        expected = ref.score(prompt, response)
        assert result.score == pytest.approx(expected, abs=1e-5)
        assert result.normalized_score == pytest.approx((result.score - 0.25) / 2.0, abs=1e-9)
        assert result.num_tokens == len(ref.ids(prompt, response)) and not result.truncated


def test_conversation_scores_like_its_split_pair(client, ref):
    conversation = [
        {"role": "user", "content": "Tell a story about a cat."},
        {"role": "assistant", "content": "Once upon a time."},
    ]
    (result,) = client.score_detailed([conversation]).results
    assert result.score == pytest.approx(ref.score(conversation[:1], "Once upon a time."), abs=1e-5)


@pytest.mark.parametrize(
    "side, shared_prefix", [("right", 0), ("left", 0), ("right", 1)], ids=["right", "left", "shared-prefix"]
)
def test_micro_batched_scores_equal_in_process_forward(rm_with_stats, ref, side, shared_prefix):
    """Concurrent callers land in one padded forward pass; every score still matches the unpadded forward."""
    n = len(PAIRS)
    with running_server(
        rm_with_stats,
        padding_side=side,
        shared_prefix_min_tokens=shared_prefix,
        max_batch_size=n,
        max_wait_ms=5000,
    ) as server:
        with server.client(timeout=60) as client:
            before = server.servicer.batcher.forward_passes
            barrier = threading.Barrier(n)

            def call(pair):
                barrier.wait()
                return client.score([pair])[0]

            with ThreadPoolExecutor(n) as pool:
                scores = list(pool.map(call, PAIRS))
            passes = server.servicer.batcher.forward_passes - before
            # and one request of many items of different lengths
            together = client.score(PAIRS)
    assert passes < n  # the callers shared forward passes (the batch fires when all n are queued)
    for (prompt, response), score, again in zip(PAIRS, scores, together, strict=True):
        expected = ref.score(prompt, response)
        assert score == pytest.approx(expected, abs=1e-5)
        assert again == pytest.approx(expected, abs=1e-5)


def test_truncation_reject_and_truncate_left(rm_with_stats, ref):
    prompt = "The quick brown fox jumps over the lazy dog. " * 10
    with running_server(rm_with_stats, max_tokens=40, max_wait_ms=0) as server, server.client() as client:
        err = rpc_error(client.score, [("ok", "fine"), (prompt, "I love it")])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("items[1]: ") and "tokens > limit 40" in err.details()
        (result,) = client.score_detailed([(prompt, "I love it")], truncation="truncate_left").results
        assert result.truncated and result.num_tokens == 40
        full = ref.ids(prompt, "I love it")
        assert result.score == pytest.approx(ref.score_ids(full[-40:]), abs=1e-5)
        assert client.model_info().max_new_tokens == 40
    with running_server(rm_with_stats, max_tokens=40, truncation="truncate_left", max_wait_ms=0) as server:
        with server.client() as client:
            assert client.score_detailed([(prompt, "I love it")]).results[0].truncated
            err = rpc_error(client.score, [(prompt, "I love it")], truncation="reject")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_limits(rm_with_stats):
    with running_server(rm_with_stats, max_pairs_per_request=3, max_text_chars=50) as server:
        with server.client(batch_size=100) as client:
            err = rpc_error(client.score, [("a", "b")] * 4)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == (
                "items: 4 items > limit 3 per request"
            )
            err = rpc_error(client.score_detailed, [])
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("items: empty")
            err = rpc_error(client.score, [("a", "b"), ("a", "b" * 51)])
            assert err.details() == "items[1].pair.response: 51 chars > limit 50"
            assert client.model_info().max_batch_size == 3
        with server.client(batch_size=3) as client:
            assert len(client.score([("a", "b")] * 7)) == 7  # the SDK splits long lists


def test_model_info(client, rm_with_stats):
    info = client.model_info()
    assert info.version == "tiny-v1" and info.name == "tiny-v1" and info.source == str(rm_with_stats)
    assert (info.reward_mean, info.reward_std) == (0.25, 2.0)
    assert info.has_chat_template and info.num_parameters > 0 and info.vocab_size == 384
    assert info.metadata["base_model"] == "tiny" and info.loaded_at.seconds > 0


def test_hot_swap_under_concurrent_load(rm_with_stats, second_rm, ref, tmp_path):
    ref2 = Reference(second_rm)
    expected = {"tiny-v1": ref, "tiny-v2": ref2}
    stop = threading.Event()
    seen: list = []
    errors: list = []

    with running_server(rm_with_stats, max_wait_ms=2, max_batch_size=4) as server:

        def caller(k):
            with server.client(retry=RetryPolicy(retry_timeout=0)) as client:
                i = 0
                while not stop.is_set() or i < 3:
                    pair = PAIRS[(k + i) % len(PAIRS)]
                    try:
                        res = client.score_detailed([pair, PAIRS[0]])
                    except grpc.RpcError as exc:  # any error fails the test
                        errors.append(exc)
                        return
                    seen.append((pair, res))
                    i += 1

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(caller, k) for k in range(6)]
            with server.client() as admin:
                while len(seen) < 10 and not all(f.done() for f in futures):
                    threading.Event().wait(0.01)
                swap = admin.load_model(str(second_rm))
                assert swap.previous_version == "tiny-v1" and swap.model.version == "tiny-v2"
                n_at_swap = len(seen)
                while len(seen) < n_at_swap + 20 and not all(f.done() for f in futures):
                    threading.Event().wait(0.01)
                stop.set()
            for f in futures:
                f.result()
        assert not errors, errors
        with server.client() as client:
            assert client.score_detailed([PAIRS[0]]).model_version == "tiny-v2"
            # a bad checkpoint is rejected and the current model keeps serving
            err = rpc_error(client.load_model, str(tmp_path / "missing"))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("path: ")
            broken = tmp_path / "broken"
            shutil.copytree(second_rm, broken)
            (broken / "model.safetensors").write_bytes(b"not weights")
            err = rpc_error(client.load_model, str(broken))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "still serving tiny-v2" in err.details()
            assert client.model_info().version == "tiny-v2"
            assert client.score_detailed([PAIRS[0]]).model_version == "tiny-v2"

    versions = [res.model_version for _, res in seen]
    assert set(versions) == {"tiny-v1", "tiny-v2"}
    for pair, res in seen:  # every response was scored entirely by the model it names
        model = expected[res.model_version]
        assert res.results[0].score == pytest.approx(model.score(*pair), abs=1e-5)
        assert res.results[1].score == pytest.approx(model.score(*PAIRS[0]), abs=1e-5)


def test_load_model_outside_model_roots_is_refused(rm_with_stats, second_rm):
    with running_server(rm_with_stats, model_roots=[str(rm_with_stats.parent)]) as server:
        with server.client() as client:
            err = rpc_error(client.load_model, str(second_rm))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_roots" in err.details()
    with running_server(rm_with_stats, allow_load_model=False) as server, server.client() as client:
        assert rpc_error(client.load_model, str(second_rm)).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_bearer_token_from_file_and_env(rm_with_stats, tmp_path, monkeypatch):
    token_file = tmp_path / "tokens"
    token_file.write_text("# mounted secret\ns3cret\n")
    with running_server(rm_with_stats, auth_token_file=str(token_file)) as server:
        assert health(server.target) == health_pb2.HealthCheckResponse.SERVING  # health needs no token
        for token in (None, "wrong"):
            with RewardClient(server.target, token=token, retry=RetryPolicy(retry_timeout=0)) as client:
                for call in (lambda c: c.score([("a", "b")]), lambda c: c.model_info()):
                    err = rpc_error(call, client)
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        with RewardClient(server.target, token="s3cret") as client:
            assert len(client.score([("a", "b")])) == 1
    monkeypatch.setenv("RLHF_AUTH_TOKEN", "from-env")
    from rlhf.core.config import load_config
    from rlhf.reward.config import RewardConfig

    assert load_config(RewardConfig).auth_token == "from-env"


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary to make a certificate")
def test_tls_and_token(rm_with_stats, tmp_path, ref):
    key, cert = _self_signed(tmp_path)
    with running_server(
        rm_with_stats, tls_cert_file=str(cert), tls_key_file=str(key), auth_token="t0k"
    ) as server:
        target = f"localhost:{server.handle.port}"
        with RewardClient(target, token="t0k", tls_ca_file=str(cert)) as client:
            assert client.score([PAIRS[1]])[0] == pytest.approx(ref.score(*PAIRS[1]), abs=1e-5)
        with RewardClient(target, token="t0k", retry=RetryPolicy(retry_timeout=0), timeout=5) as plain:
            assert rpc_error(plain.model_info).code() == grpc.StatusCode.UNAVAILABLE  # plaintext refused


def test_queue_full_is_resource_exhausted(rm_with_stats):
    with running_server(rm_with_stats, max_queue=3, max_wait_ms=0) as server:
        with server.client(retry=RetryPolicy(retry_timeout=0)) as client:
            err = rpc_error(client.score, [("a", "b")] * 4)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.details()
            assert len(client.score([("a", "b")] * 3)) == 3


def test_undecodable_bytes_are_invalid_argument(server):
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary("/rlhf.v1.RewardService/Score")  # bytes in, bytes out
        err = rpc_error(raw, b"\xff\xff\xff", timeout=10)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("request: not a valid rlhf.v1.ScoreRequest")
    assert health(server.target) == health_pb2.HealthCheckResponse.SERVING


def test_metrics(rm_with_stats):
    with running_server(rm_with_stats, metrics_port=0) as server, server.client() as client:
        client.score(PAIRS)
        rpc_error(client.score, [("", "x")])
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.handle.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    for name in [
        "rlhf_reward_pairs_scored_total",
        "rlhf_reward_request_duration_seconds_bucket",
        "rlhf_reward_batch_size_bucket",
        "rlhf_reward_queue_depth",
        'rlhf_reward_model_info{version="tiny-v1"} 1.0',
        'rlhf_reward_model_loads_total{result="success"}',
        "rlhf_reward_score_bucket",
        'rlhf_reward_requests_rejected_total{reason="invalid"}',
        'rlhf_grpc_server_requests_total{code="OK",method="Score",service="rlhf.v1.RewardService"}',
    ]:
        assert name in text, name


def test_async_client(server, ref):
    import asyncio

    from rlhf.reward.client import AsyncRewardClient

    async def go():
        async with AsyncRewardClient(server.target) as client:
            scores = await asyncio.gather(*(client.score([p]) for p in PAIRS))
            info = await client.model_info()
            detailed = await client.score_detailed(PAIRS[:2])
            return scores, info, detailed

    scores, info, detailed = asyncio.run(go())
    assert info.version == detailed.model_version == "tiny-v1"
    for pair, (score,) in zip(PAIRS, scores, strict=True):
        assert score == pytest.approx(ref.score(*pair), abs=1e-5)


def test_server_without_a_model_waits_for_load_model(rm_with_stats, ref):
    with (
        running_server(None) as server,
        server.client(retry=RetryPolicy(retry_timeout=0)) as client,
    ):
        for call in (lambda: client.score([PAIRS[0]]), client.model_info):
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "LoadModel" in err.details()
        swap = client.load_model(str(rm_with_stats))
        assert swap.previous_version == "" and swap.model.version == "tiny-v1"
        assert client.score([PAIRS[1]])[0] == pytest.approx(ref.score(*PAIRS[1]), abs=1e-5)
