"""The FeedbackService over gRPC, against both backends: statuses, streaming export, snapshots, metrics."""

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.feedback import records as rec
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

from .conftest import running_server


def comparisons(n, prefix="k", start=0, labeler="alice"):
    return [
        rec.make_comparison(
            f"p{i}", [f"a{i}", f"b{i}"], idempotency_key=f"{prefix}{i}", chosen_index=1, labeler_id=labeler
        )
        for i in range(start, start + n)
    ]


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def test_writes_are_idempotent_over_grpc(client):
    first = client.add_comparisons(comparisons(25))
    again = client.add_comparisons(comparisons(25))
    assert list(first.ids) == list(again.ids) and again.created == 0 and again.existing == 25
    assert client.get_stats().records_by_kind["comparison"] == 25


def test_client_splits_large_writes_into_batches(server):
    with server.client(batch_size=10) as client:
        result = client.add_comparisons(comparisons(35))
        assert len(result.ids) == 35 and result.created == 35
        assert len(set(result.ids)) == 35


def test_invalid_batch_is_invalid_argument_naming_index_and_field(client):
    batch = comparisons(5)
    batch[3].responses[1].text = batch[3].responses[0].text
    err = rpc_error(client.add_comparisons, batch)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "comparisons[3].responses[1].text: identical to responses[0]"
    err = rpc_error(client.add_ratings, [rec.make_rating("q", "r", 11, scale=(0, 10), idempotency_key="r")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(
        "ratings[0].score: 11.0 outside"
    )
    assert sum(client.get_stats().records_by_kind.values()) == 0


def test_conflicting_replay_is_already_exists(client):
    client.add_comparisons(comparisons(1))
    changed = comparisons(1)
    changed[0].chosen_index = 0
    err = rpc_error(client.add_comparisons, changed)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "comparisons[0].idempotency_key" in err.details()


def test_empty_and_oversized_batches(server):
    stub = feedback_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(server.target))
    err = rpc_error(stub.AddComparisons, feedback_pb2.AddComparisonsRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in err.details()


def test_export_streams_pages_and_resumes_from_a_cursor(client):
    client.add_comparisons(comparisons(30))  # export_page_size=7 in the fixture: 5 pages
    client.add_ratings([rec.make_rating("q", f"r{i}", 3, idempotency_key=f"r{i}") for i in range(3)])
    everything = list(client.export())
    assert len(everything) == 33
    assert [m.WhichOneof("record") for m in everything] == ["comparison"] * 30 + ["rating"] * 3
    first = list(client.export(limit=11))
    rest = list(client.export(cursor=first[-1].cursor))
    assert [m.cursor for m in first + rest] == [m.cursor for m in everything]
    assert len(list(client.export(kinds=["rating"]))) == 3
    err = rpc_error(lambda: list(client.export(cursor="bogus")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("cursor:")


def test_snapshots_over_grpc(client):
    client.add_comparisons(comparisons(40))
    snap = client.create_snapshot(
        "rm-train", eval_fraction=0.2, seed=5, kinds=["comparison"], description="RM data"
    )
    assert snap.num_train + snap.num_eval == 40
    assert (
        client.create_snapshot("rm-train", eval_fraction=0.2, seed=5, kinds=["comparison"]).content_hash
        == snap.content_hash
    )
    err = rpc_error(client.create_snapshot, "rm-train", eval_fraction=0.3, seed=5)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    train = list(client.export(snapshot="rm-train", split="train"))
    evals = list(client.export(snapshot="rm-train", split="eval"))
    assert (len(train), len(evals)) == (snap.num_train, snap.num_eval)
    assert all(m.split == feedback_pb2.SPLIT_TRAIN for m in train)
    assert client.get_snapshot("rm-train").content_hash == snap.content_hash
    assert [s.name for s in client.list_snapshots()] == ["rm-train"]
    assert rpc_error(client.get_snapshot, "nope").code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: list(client.export(snapshot="nope"))).code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(client.create_snapshot, "empty", kinds=["demonstration"])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_metrics_count_written_and_rejected_records(tmp_path):
    with running_server(database_url=f"sqlite:///{tmp_path}/m.db", metrics_port=0) as server:
        port = server.handle.metrics_port
        with server.client() as client:
            client.add_comparisons(comparisons(4, prefix="metric"))
            bad = comparisons(3, prefix="metric-bad")
            bad[1].chosen_index = 9
            rpc_error(client.add_comparisons, bad)
            client.get_stats()
            list(client.export())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(line_start):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    assert value('rlhf_feedback_records_written_total{kind="comparison"}') >= 4
    assert value('rlhf_feedback_records_rejected_total{kind="comparison",reason="chosen_out_of_range"}') >= 3
    assert value('rlhf_feedback_write_duration_seconds_count{kind="comparison"}') >= 2
    assert value('rlhf_feedback_read_duration_seconds_count{op="export"}') >= 1
    assert value("rlhf_feedback_store_size_bytes") > 0
    assert 'rlhf_feedback_records{kind="comparison"}' in text


def test_health_is_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rlhf.v1.FeedbackService")
        )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
