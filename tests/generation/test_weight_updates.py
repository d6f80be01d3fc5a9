"""UpdateWeights on a running server: swaps are atomic between batches, bad updates leave the old weights serving."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from safetensors.torch import save_file

from rlhf.core.chat import encode_prompt
from rlhf.core.models import load_causal_lm, load_tokenizer
from rlhf.generation.client import PolicyClient
from rlhf.generation.weights import serialize_state_dict, sha256_hex
from rlhf.v1 import policy_pb2

from .conftest import metric, rpc_error, scrape, start_generation

PROMPTS = ["Tell a story about a cat.", "Hello, how are you today?"]


@pytest.fixture(scope="module")
def service(launcher, tiny_lm_path):
    return start_generation(launcher, "policy-updates", tiny_lm_path, "--max-batch-size", "8")


@pytest.fixture(scope="module")
def client(service):
    with PolicyClient(service.target, timeout=120) as client:
        yield client


def greedy(model, tok, prompt, n=12):
    ids = encode_prompt(tok, prompt)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
    )
    tokens = out[0, len(ids) :].tolist()
    eos = tok.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def expected(tiny_lm_path, peaked_lm_path):
    """Greedy outputs of each prompt under the start weights (tiny) and the pushed ones (peaked)."""
    tok = load_tokenizer(tiny_lm_path)
    v0, v1 = load_causal_lm(tiny_lm_path), load_causal_lm(peaked_lm_path)
    return {
        "tiny": [greedy(v0, tok, p) for p in PROMPTS],
        "peaked": [greedy(v1, tok, p) for p in PROMPTS],
        "tiny_state": v0.state_dict(),
        "peaked_state": v1.state_dict(),
    }


def outputs(client, **kw):
    response = client.generate_response(PROMPTS, max_new_tokens=12, temperature=0.0, **kw)
    return response, [list(s.token_ids) for s in response.samples]


def test_greedy_on_the_tiny_fixture_equals_model_generate(client, expected):
    _, tokens = outputs(client)
    assert tokens == expected["tiny"]


def test_update_mid_traffic_never_mixes_versions(client, service, expected, peaked_lm_path):
    assert expected["tiny"] != expected["peaked"]
    by_version = {0: expected["tiny"], 1: expected["peaked"]}
    stop = threading.Event()
    seen: list[policy_pb2.GenerateResponse] = []
    errors: list[Exception] = []

    def traffic():
        try:
            while not stop.is_set():
                seen.append(outputs(client)[0])
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    while len(seen) < 8:
        threading.Event().wait(0.01)
    version = client.update_weights(version=1, checkpoint_path=str(peaked_lm_path))
    count_at_update = len(seen)
    while len(seen) < count_at_update + 8:
        threading.Event().wait(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and version == 1
    assert {r.policy_version for r in seen} == {0, 1}
    for response in seen:
        assert {s.policy_version for s in response.samples} == {response.policy_version}
        assert [list(s.token_ids) for s in response.samples] == by_version[response.policy_version]
    # once the push returned, every request is served by the new version
    response, tokens = outputs(client, min_policy_version=1)
    assert response.policy_version == 1 and tokens == expected["peaked"]
    assert client.model_info().version == "1"


def _bad_updates(tmp_path, expected):
    state = {k: v.clone() for k, v in expected["tiny_state"].items()}
    name = "model.layers.0.mlp.up_proj.weight"
    wrong_shape = {name: torch.zeros(3, 3)}
    wrong_dtype = {name: state[name].to(torch.float16)}
    nan = {name: torch.full_like(state[name], float("nan"))}
    unknown = {"model.layers.9.mlp.up_proj.weight": state[name]}
    missing = {name: state[name]}
    save_file(wrong_shape, tmp_path / "wrong_shape.safetensors")
    return [
        (dict(version=1, state_dict=state), grpc.StatusCode.FAILED_PRECONDITION, "target_version"),
        (
            dict(version=2, state_dict=wrong_shape, partial=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            "shape [3, 3]",
        ),
        (
            dict(version=2, state_dict=wrong_dtype, partial=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dtype float16",
        ),
        (dict(version=2, state_dict=nan, partial=True), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (
            dict(version=2, state_dict=unknown, partial=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a parameter",
        ),
        (dict(version=2, state_dict=missing), grpc.StatusCode.INVALID_ARGUMENT, "missing"),
        (
            dict(version=2, state_dict=state, sha256="0" * 64),
            grpc.StatusCode.INVALID_ARGUMENT,
            "metadata.sha256",
        ),
        (
            dict(version=2, checkpoint_path=str(tmp_path / "wrong_shape.safetensors"), partial=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            "shape",
        ),
        (
            dict(version=2, checkpoint_path=str(tmp_path / "nope")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "checkpoint_path",
        ),
    ]


def test_bad_updates_are_rejected_and_the_old_weights_keep_serving(client, service, expected, tmp_path):
    before = scrape(service)
    cases = _bad_updates(tmp_path, expected)
    for kwargs, code, text in cases:
        err = rpc_error(client.update_weights, **kwargs)
        assert err.code() == code, (kwargs.keys(), err.details())
        assert text in err.details()
    # raw garbage with a correct checksum, and a stream whose first message is not metadata
    garbage = b"not safetensors at all"
    meta = policy_pb2.WeightsMetadata(target_version=2, sha256=sha256_hex(garbage), total_bytes=len(garbage))
    err = rpc_error(
        client.stub.UpdateWeights,
        iter(
            [policy_pb2.UpdateWeightsRequest(metadata=meta), policy_pb2.UpdateWeightsRequest(chunk=garbage)]
        ),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in err.details()
    err = rpc_error(client.stub.UpdateWeights, iter([policy_pb2.UpdateWeightsRequest(chunk=b"x")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("metadata")
    response, tokens = outputs(client)
    assert response.policy_version == 1 and tokens == expected["peaked"]
    after = scrape(service)
    rejected = sum(
        metric(after, "rlhf_generation_weight_updates_total", f'result="{r}"')
        - metric(before, "rlhf_generation_weight_updates_total", f'result="{r}"')
        for r in ("invalid", "rejected")
    )
    assert rejected == len(cases) + 2
    assert metric(after, "rlhf_generation_policy_version") == 1


def test_streamed_state_dict_update(client, service, expected):
    data = serialize_state_dict(expected["tiny_state"])
    response = client.update_weights_response(version=5, state_dict=expected["tiny_state"])
    assert response.policy_version == 5 and response.num_bytes == len(data) and response.num_tensors > 0
    _, tokens = outputs(client)
    assert tokens == expected["tiny"]
    text = scrape(service)
    assert metric(text, "rlhf_generation_policy_version") == 5
    assert metric(text, "rlhf_generation_weight_update_duration_seconds_count") == 2


def test_a_ppo_checkpoint_folder_loads_without_its_value_head(client, expected, peaked_lm_path, tmp_path):
    """A PPO run's final folder holds model.safetensors and value_head.safetensors beside it: UpdateWeights by
    path reads the model's file only (as from_pretrained does) and serves the policy."""
    import shutil

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "ppo-final"
    shutil.copytree(peaked_lm_path, folder)
    assert (folder / "model.safetensors").exists()
    save_file(
        {"initialized": torch.ones(1), "summary.weight": torch.zeros(1, 8)}, folder / "value_head.safetensors"
    )
    assert client.update_weights(version=6, checkpoint_path=str(folder)) == 6
    _, tokens = outputs(client)
    assert tokens == expected["peaked"]


def _tiny_shards(folder, shard_names):
    """A sharded safetensors folder whose index maps one tensor to each of ``shard_names``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, name in enumerate(shard_names):
        save_file({f"w{i}": torch.zeros(2)}, str(folder / name))
        weight_map[f"w{i}"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    from rlhf.core.errors import InvalidArgument
    from rlhf.generation.weights import tensors_from_path

    (tmp_path / "secret.safetensors").parent.mkdir(exist_ok=True)
    save_file({"stolen": torch.ones(1)}, str(tmp_path / "secret.safetensors"))
    folder = _tiny_shards(tmp_path / "ckpt", ["model-1.safetensors"])
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("model-1.safetensors", "../secret.safetensors"))
    with pytest.raises(InvalidArgument, match="outside"):
        tensors_from_path(str(folder))


def test_weight_roots_confine_every_file_an_update_reads(tmp_path):
    from rlhf.core.errors import InvalidArgument
    from rlhf.generation.weights import tensors_from_path

    root, elsewhere = tmp_path / "push", tmp_path / "elsewhere"
    inside = _tiny_shards(root / "v2", ["model-1.safetensors", "model-2.safetensors"])
    assert set(tensors_from_path(str(inside), roots=[str(root)])) == {"w0", "w1"}
    outside = _tiny_shards(elsewhere / "v2", ["model-1.safetensors"])
    with pytest.raises(InvalidArgument, match="weight_roots"):
        tensors_from_path(str(outside), roots=[str(root)])
    (root / "link").symlink_to(outside)  # a symlink under the root pointing out of it is outside
    with pytest.raises(InvalidArgument, match="weight_roots"):
        tensors_from_path(str(root / "link"), roots=[str(root)])
    with pytest.raises(InvalidArgument, match="weight_roots"):
        tensors_from_path(str(root / ".." / "elsewhere" / "v2"), roots=[str(root)])


def test_a_service_with_weight_roots_refuses_a_push_from_outside_and_keeps_serving(
    launcher, tiny_lm_path, peaked_lm_path, tmp_path
):
    import shutil

    root = tmp_path / "allowed"
    shutil.copytree(peaked_lm_path, root / "peaked")
    service = start_generation(launcher, "policy-roots", tiny_lm_path, "--weight-roots", str(root))
    with PolicyClient(service.target, timeout=120) as client:
        err = rpc_error(client.update_weights, version=1, checkpoint_path=str(peaked_lm_path))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "weight_roots" in err.details()
        assert int(client.model_info().version or 0) == 0
        assert client.update_weights(version=1, checkpoint_path=str(root / "peaked")) == 1
