"""The feedback benchmark's profile: py-spy's samples of the server land in the store's split modules."""

from __future__ import annotations

from rlhf.bench.feedback import OTHER, _profile_summary

SERVE = "_call_behavior (grpc/_server.py:500);AddRecords (rlhf/feedback/server.py:90)"
WRITE = f"{SERVE};FeedbackStore.add_ratings (rlhf/feedback/store.py:176);RecordWriter.write (rlhf/feedback/writes.py:130)"


def test_profile_attributes_samples_to_the_split_store_modules(tmp_path):
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "\n".join(
            [
                f"{SERVE};FeedbackStore.prepare (rlhf/feedback/store.py:153);RecordWriter.prepare (rlhf/feedback/writes.py:110);make_row (rlhf/feedback/writes.py:60) 4",
                f"{WRITE};RecordWriter._insert_records (rlhf/feedback/writes.py:160);execute (sqlalchemy/engine/base.py:1400) 3",
                f"{SERVE};Database.write_tx (rlhf/feedback/engine.py:88);__enter__ (contextlib.py:137) 2",
                f"{WRITE};_first_of_each_key (rlhf/feedback/writes.py:255) 1",
                f"{SERVE};deserialize (grpc/_common.py:80) 2",
            ]
        )
        + "\n"
    )
    summary = _profile_summary(raw)
    assert summary["samples"] == 12
    assert summary["breakdown"] == {
        "payloads and hashes": round(4 / 12, 3),
        "insert (executemany)": 0.25,
        "begin transaction, lock": round(2 / 12, 3),
        OTHER: round(2 / 12, 3),
        "other store code": round(1 / 12, 3),
    }
