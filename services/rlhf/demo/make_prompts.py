"""Write the demo's shipped prompt set, ``services/rlhf/demo/data/prompts.jsonl`` (deterministic; re-run to rebuild).

Every prompt is a template of one category (review, message, story, advice) filled with a subject of that
category; every template asks for a short reply, so a good answer fits in the demo's response budget. The
train/eval split is fixed by a hash of the prompt text (about one prompt in five is held out for evaluation),
so adding templates or subjects never moves an existing prompt between splits.

    python -m rlhf.demo.make_prompts            # rewrites services/rlhf/demo/data/prompts.jsonl
    python -m rlhf.demo.make_prompts --check    # exit 1 when the shipped file is stale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "data" / "prompts.jsonl"
EVAL_PER_MILLE = 200  # a prompt is held out when sha256(text) mod 1000 < this

TEMPLATES: dict[str, list[str]] = {
    "review": [
        "Write a two-sentence review of {s}.",
        "Write a short customer review of {s}.",
        "In one or two sentences, review {s}.",
        "Write a brief online review of {s} for other people.",
        "Describe your experience with {s} in a short review.",
    ],
    "message": [
        "Write a short text message to a friend about {s}.",
        "Write a brief note to a coworker about {s}.",
        "Write a one-paragraph message to your neighbour about {s}.",
        "Send a short message to your family about {s}.",
        "Write a two-sentence message to a classmate about {s}.",
    ],
    "story": [
        "Tell a very short story about {s}.",
        "Write a three-sentence story about {s}.",
        "Write the opening two sentences of a story about {s}.",
        "Tell a tiny bedtime story about {s}.",
        "In a few sentences, tell a story about {s}.",
    ],
    "advice": [
        "Give me one short piece of advice about {s}.",
        "In two sentences, what would you tell someone about {s}?",
        "Share a quick tip about {s}.",
        "I am nervous about {s}. What should I keep in mind?",
        "Briefly, how should I approach {s}?",
    ],
}

SUBJECTS: dict[str, list[str]] = {
    "review": [
        "a neighbourhood coffee shop",
        "a pair of running shoes",
        "a budget smartphone",
        "a family-run pizza place",
        "a science fiction novel",
        "a city bus service",
        "a weekend camping trip",
        "a cooking class",
        "a pair of wireless headphones",
        "a small hotel by the sea",
        "a public library",
        "a yoga studio",
        "a used bicycle you bought",
        "a museum of modern art",
        "a board game for families",
        "a local farmers market",
        "an online language course",
        "a winter jacket",
        "a dentist's office",
        "a concert in the park",
        "a sushi restaurant",
        "a laptop for students",
    ],
    "message": [
        "a birthday party next week",
        "a job you just got",
        "a missed phone call",
        "borrowing a ladder",
        "a delayed train",
        "a team project deadline",
        "a new puppy",
        "moving to a new city",
        "a thank-you for dinner",
        "a lost umbrella",
        "a rainy weekend",
        "a football match on Saturday",
        "a recipe you tried",
        "a holiday trip",
        "a noisy party last night",
        "a surprise gift",
        "a change of plans for lunch",
        "getting well soon",
        "a graduation ceremony",
        "a garden that finally bloomed",
        "a shared car ride",
        "an exam result",
    ],
    "story": [
        "a cat who wanted to fly",
        "a robot learning to paint",
        "a lighthouse keeper",
        "a lost key",
        "two friends on a rainy day",
        "a dragon who was afraid of the dark",
        "a child's first day at school",
        "a baker in a small village",
        "a message in a bottle",
        "an old tree in a park",
        "a snowman in spring",
        "a brave little mouse",
        "a train that never stopped",
        "a girl who collected stars",
        "a grandfather's watch",
        "a fox and a crow",
        "a musician on a street corner",
        "a garden gnome",
        "a ship in a storm",
        "a forgotten birthday",
        "a talking parrot",
        "a mountain climber",
    ],
    "advice": [
        "learning to cook",
        "starting a new job",
        "saving money",
        "learning a new language",
        "a job interview",
        "making new friends in a new city",
        "running a first marathon",
        "keeping a plant alive",
        "studying for an exam",
        "public speaking",
        "sleeping better",
        "moving house",
        "raising a puppy",
        "asking for a raise",
        "learning to play the guitar",
        "travelling alone",
        "dealing with a difficult neighbour",
        "writing a cover letter",
        "getting up early",
        "working from home",
        "a first date",
        "cooking for a large family dinner",
    ],
}


def split_of(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 1000
    return "eval" if bucket < EVAL_PER_MILLE else "train"


def build_prompts() -> list[dict]:
    """Every template x subject of each category, in a fixed order, with an id and a split."""
    rows = []
    for category, templates in TEMPLATES.items():
        for t_index, template in enumerate(templates):
            for s_index, subject in enumerate(SUBJECTS[category]):
                text = template.format(s=subject)
                rows.append(
                    {
                        "id": f"{category}-{t_index:02d}-{s_index:02d}",
                        "prompt": text,
                        "category": category,
                        "split": split_of(text),
                    }
                )
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the templates")
    args = parser.parse_args(argv)
    text = render(build_prompts())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m rlhf.demo.make_prompts", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    rows = build_prompts()
    n_eval = sum(r["split"] == "eval" for r in rows)
    print(f"wrote {len(rows)} prompts ({len(rows) - n_eval} train, {n_eval} eval) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
