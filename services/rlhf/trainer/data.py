"""Training data for the trainer jobs: demonstrations, comparisons and prompts, split into train and eval.

Where records come from (``TrainJobConfig``):

* ``snapshot`` on the feedback store (``feedback_target`` = a running FeedbackService, or
  ``feedback_database_url`` = its database opened directly): the snapshot's own train/eval split is used, so
  a run cites exactly what it trained on;
* ``data_file``: a JSONL file in the TRL formats (see rlhf.feedback.jsonl), for offline use; the eval split is
  ``eval_data_file`` or ``eval_fraction`` of the records, chosen by a hash of (seed, record key) so it does
  not depend on the order of the lines.

Comparisons become (chosen, rejected) pairs: a full ranking gives every ordered pair, a ``chosen_index``
alone gives the chosen response against each other one. Ratings become pairs too: the ratings of one prompt
(in one split) are scaled to 0..1 by their rating scale, averaged per distinct response, and any two responses
whose scores differ by more than ``rating_margin`` make a pair (the higher one chosen).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch

from rlhf.core.chat import tokenize_prompt_response
from rlhf.feedback import jsonl
from rlhf.feedback import records as rec
from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.store import FeedbackStore
from rlhf.feedback.validation import rating_scale
from rlhf.trainer.config import TrainJobConfig

log = logging.getLogger("rlhf.trainer.data")

Prompt = str | list[dict]


@dataclass(frozen=True)
class Demonstration:
    prompt: Prompt | tuple
    response: str
    id: str = ""


@dataclass(frozen=True)
class Comparison:
    prompt: Prompt | tuple
    chosen: str
    rejected: str
    id: str = ""


@dataclass
class Splits:
    """Train and eval lists of one record type."""

    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.train) + len(self.eval)


@dataclass
class RawRecord:
    kind: str  # prompt | demonstration | comparison | rating
    message: Any  # the rlhf.v1 record message
    split: str  # train | eval


# ---- reading records ------------------------------------------------------------------------------------


def prompt_value(prompt) -> Prompt:
    """A common_pb2.Prompt as text or a list of {"role", "content"} messages (what rlhf.core.chat takes)."""
    payload = rec.prompt_payload(prompt) or {"text": ""}
    return payload["text"] if "text" in payload else payload["chat"]


def prompt_key(prompt: Prompt) -> str:
    """The same string for equal prompts (text or chat messages)."""
    return rec.canonical_json(prompt)


def hash_split(key: str, seed: int, eval_fraction: float) -> str:
    """'eval' for a stable ``eval_fraction`` share of keys (depends only on seed and key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def _record_key(kind: str, message) -> str:
    return message.idempotency_key or rec.canonical_json(rec.prompt_payload(message.prompt))


def _read_jsonl_file(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return jsonl.read_jsonl(f)


def iter_records(cfg: TrainJobConfig, kinds: Iterable[str]) -> Iterator[RawRecord]:
    """Records of ``kinds`` with their split, from the snapshot or the JSONL file of ``cfg``."""
    kinds = list(kinds)
    if cfg.data_file:
        for item in _read_jsonl_file(cfg.data_file):
            if item.kind in kinds:
                split = (
                    "train"
                    if cfg.eval_data_file
                    else hash_split(_record_key(item.kind, item.message), cfg.seed, cfg.eval_fraction)
                )
                yield RawRecord(item.kind, item.message, split)
        if cfg.eval_data_file:
            for item in _read_jsonl_file(cfg.eval_data_file):
                if item.kind in kinds:
                    yield RawRecord(item.kind, item.message, "eval")
        return
    if not (cfg.feedback_target or cfg.feedback_database_url):
        raise ValueError("data: give data_file, or snapshot with feedback_target or feedback_database_url")
    if not cfg.snapshot:
        log.warning("no snapshot given: training on every record, split by eval_fraction (not reproducible)")
    request = rec.make_export_request(snapshot=cfg.snapshot, kinds=kinds)
    for response in _export(cfg, request):
        message = rec.exported_record(response)
        if cfg.snapshot:
            split = rec.SPLIT_NAMES.get(response.split, "train")
        else:
            split = hash_split(_record_key(rec.exported_kind(response), message), cfg.seed, cfg.eval_fraction)
        yield RawRecord(rec.exported_kind(response), message, split)


def _export(cfg: TrainJobConfig, request) -> Iterator:
    if cfg.feedback_target:
        with FeedbackClient(cfg.feedback_target, token=cfg.feedback_token) as client:
            yield from client.export(request)
        return
    config = FeedbackConfig(database_url=cfg.feedback_database_url)
    with FeedbackStore.from_config(config) as store:
        yield from store.export(request)


# ---- records -> training examples -----------------------------------------------------------------------


def comparison_pairs(message) -> list[tuple[int, int]]:
    """(preferred index, other index) pairs of a Comparison message."""
    n = len(message.responses)
    ranking = [i for i in message.ranking if 0 <= i < n]
    if len(ranking) >= 2:
        return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]
    chosen = message.chosen_index if message.HasField("chosen_index") else (ranking[0] if ranking else 0)
    return [(chosen, i) for i in range(n) if i != chosen]


def ratings_to_comparisons(ratings: Iterable[RawRecord], margin: float = 0.0) -> list[tuple[str, Comparison]]:
    """(split, Comparison) pairs from ratings of the same prompt in the same split (see module docstring)."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    prompts: dict[tuple[str, str], Prompt] = {}
    for item in ratings:
        prompt = prompt_value(item.message.prompt)
        low, high = rating_scale(item.message)
        if high <= low:
            continue
        key = (item.split, prompt_key(prompt))
        prompts[key] = prompt
        groups[key][item.message.response.text].append((item.message.score - low) / (high - low))
    out = []
    for key, by_response in groups.items():
        means = {text: sum(v) / len(v) for text, v in by_response.items()}
        for (a, sa), (b, sb) in combinations(sorted(means.items()), 2):
            if abs(sa - sb) <= margin:
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            pair_id = "rating:" + hashlib.sha256(f"{key[1]}\0{chosen}\0{rejected}".encode()).hexdigest()[:16]
            out.append((key[0], Comparison(_freeze(prompts[key]), chosen, rejected, pair_id)))
    return out


def _freeze(prompt: Prompt) -> Prompt | tuple:
    """Chat prompts are stored as tuples of message dicts in the frozen records (str prompts as they are)."""
    return prompt if isinstance(prompt, str) else tuple(prompt)


def as_prompt(prompt: Prompt | tuple) -> Prompt:
    """The prompt in the form rlhf.core.chat takes (a str or a list of messages)."""
    return prompt if isinstance(prompt, str) else list(prompt)


def load_demonstrations(cfg: TrainJobConfig) -> Splits:
    """Demonstrations (prompt, ideal response) of the configured data source."""
    splits = Splits()
    for item in iter_records(cfg, ["demonstration"]):
        demo = Demonstration(
            _freeze(prompt_value(item.message.prompt)), item.message.response.text, item.message.id
        )
        getattr(splits, item.split).append(demo)
    return splits


def load_comparisons(cfg: TrainJobConfig, rating_margin: float = 0.0) -> Splits:
    """Comparisons as (chosen, rejected) pairs, including pairs derived from ratings."""
    splits = Splits()
    ratings = []
    for item in iter_records(cfg, ["comparison", "rating"]):
        if item.kind == "rating":
            ratings.append(item)
            continue
        prompt = _freeze(prompt_value(item.message.prompt))
        texts = [r.text for r in item.message.responses]
        for k, (i, j) in enumerate(comparison_pairs(item.message)):
            if texts[i] != texts[j]:
                pair = Comparison(
                    prompt, texts[i], texts[j], f"{item.message.id or item.message.idempotency_key}:{k}"
                )
                getattr(splits, item.split).append(pair)
    for split, pair in ratings_to_comparisons(ratings, rating_margin):
        getattr(splits, split).append(pair)
    return splits


def load_prompts(cfg: TrainJobConfig, kinds: Iterable[str] = ("prompt",)) -> Splits:
    """Distinct prompts (str or message lists) of records of ``kinds`` (default: prompt records), per split."""
    splits = Splits()
    seen: set[tuple[str, str]] = set()
    for item in iter_records(cfg, kinds):
        prompt = prompt_value(item.message.prompt)
        key = (item.split, prompt_key(prompt))
        if key not in seen:
            seen.add(key)
            getattr(splits, item.split).append(prompt)
    return splits


# ---- tokenization and batching --------------------------------------------------------------------------


def encode_sft_example(tokenizer, demo: Demonstration, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) with labels -100 on the prompt: the loss is on the response (and its EOS) only.

    Longer than ``max_length``: the response's end is cut. None when the prompt alone leaves no room."""
    prompt_ids, response_ids = tokenize_prompt_response(tokenizer, as_prompt(demo.prompt), demo.response)
    if len(prompt_ids) >= max_length - 1:
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return ids, labels


def encode_scored_text(tokenizer, prompt: Prompt | tuple, response: str, max_length: int) -> list[int]:
    """Prompt + response (+EOS) as a reward model reads them; too long: the prompt's start is cut."""
    prompt_ids, response_ids = tokenize_prompt_response(tokenizer, as_prompt(prompt), response)
    return (prompt_ids + response_ids)[-max_length:]


def pad_right(sequences: list[list[int]], pad_value: int):
    """(tensor [B, T], mask [B, T]) with ``pad_value`` after each sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
