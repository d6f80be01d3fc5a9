"""One of several concurrent writers (tests/feedback/test_concurrency.py): the plan of keys each writer sends,
and ``python concurrent_writer.py URL WRITER SEED`` writing that plan straight into a store, printing JSON."""

from __future__ import annotations

import json
import random
import sys

from rlhf.feedback import records as rec

WRITERS = 8
SPAN = 90  # keys per writer; writer w owns [w*45, w*45+90): half shared with each neighbour
HOT = 20  # keys every writer sends


def comparison(k: int):
    """The content of key k (the same whoever sends it)."""
    return rec.make_comparison(
        f"concurrent prompt {k}",
        [f"first answer {k}", f"second answer {k}"],
        idempotency_key=f"cc-{k}",
        chosen_index=k % 2,
        labeler_id=f"writer-labeler-{k % 3}",
    )


def all_keys() -> set[int]:
    return set(range(HOT)) | {
        HOT + k for w in range(WRITERS) for k in range(w * SPAN // 2, w * SPAN // 2 + SPAN)
    }


def plan(writer: int, seed: int) -> list[list[int]]:
    """Batches of keys: the writer's span and the hot keys, shuffled, in random sizes, some keys twice."""
    rng = random.Random(seed * 1000 + writer)
    keys = list(range(HOT)) + [HOT + k for k in range(writer * SPAN // 2, writer * SPAN // 2 + SPAN)]
    keys += rng.sample(keys, 15)  # replays within this writer
    rng.shuffle(keys)
    batches, start = [], 0
    while start < len(keys):
        size = rng.randint(1, 24)
        batches.append(keys[start : start + size])
        start += size
    return batches


def run(sink, writer: int, seed: int) -> dict:
    """Send the plan to ``sink`` (a FeedbackStore or FeedbackClient); the ids it got back and its counts."""
    ids: dict[str, str] = {}
    created = existing = 0
    for keys in plan(writer, seed):
        result = sink.add_comparisons([comparison(k) for k in keys])
        for k, record_id in zip(keys, result.ids, strict=True):
            assert ids.setdefault(f"cc-{k}", record_id) == record_id
        created += result.created
        existing += result.existing
    return {"ids": ids, "created": created, "existing": existing}


def main() -> None:
    from rlhf.feedback.store import FeedbackStore

    url, writer, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with FeedbackStore(url) as store:  # every writer also runs the migrations: concurrently on a new database
        out = run(store, writer, seed)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
