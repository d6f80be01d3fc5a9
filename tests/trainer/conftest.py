"""Small synthetic data sets for the trainer tests (JSONL in the TRL formats)."""

from __future__ import annotations

import json
import random

import pytest

SUBJECTS = ["the cat", "a dog", "the sea", "this train", "my friend", "the weather", "the food", "the movie"]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory) -> str:
    """Demonstrations whose response follows from the prompt (learnable by a tiny model)."""
    rng = random.Random(0)
    rows = []
    for i in range(64):
        subject = rng.choice(SUBJECTS)
        rows.append(
            {
                "prompt": f"Tell a story about {subject}. ({i})",
                "completion": f"Once upon a time there was {subject}. It was happy.",
            }
        )
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", rows)


@pytest.fixture(scope="session")
def preference_jsonl(tmp_path_factory) -> str:
    """Preferences with a known answer: the chosen response says "wonderful", the rejected one "terrible"."""
    rng = random.Random(1)
    rows = []
    for i in range(160):
        stem = f"{rng.choice(SUBJECTS)} {rng.choice(['is', 'was', 'looks', 'seems'])}"
        rows.append(
            {
                "prompt": f"Tell me about {rng.choice(SUBJECTS)} ({i})",
                "chosen": f"{stem} wonderful.",
                "rejected": f"{stem} terrible.",
            }
        )
    return write_jsonl(tmp_path_factory.mktemp("rm-data") / "prefs.jsonl", rows)
