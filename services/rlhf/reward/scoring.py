"""Reward models in memory, and the one way requests become token ids and token ids become scores.

No server here: the servicer and the tests call these functions directly. Text is formatted exactly as the
reward-model trainer formats it (``rlhf.core.chat.tokenize_prompt_response``: the prompt rendered with the chat
template and the generation prompt, then the response and EOS), and scores are ``rlhf.core.models.reward_forward``
(the head at the last real token, padding-independent).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.core import chat
from rlhf.core.errors import InvalidArgument, require
from rlhf.core.models import (
    common_prefix_length,
    last_real_token_index,
    load_reward_model,
    load_tokenizer,
    position_ids_from_mask,
    reward_forward,
    score_head,
)
from rlhf.reward.checkpoint import read_reward_metadata

log = logging.getLogger("rlhf.reward")

ROLES = ("system", "user", "assistant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRUNCATE_LEFT = "truncate_left"
REJECT = "reject"


@dataclass
class LoadedModel:
    """A reward model ready to score: weights, tokenizer, the checkpoint's statistics and its version."""

    model: torch.nn.Module
    tokenizer: object
    path: str
    version: str
    metadata: dict
    dtype: str
    max_tokens: int
    loaded_at: float = field(default_factory=time.time)
    prefix_sharing: bool = True  # set False when the architecture cannot reuse a key/value cache

    @property
    def reward_mean(self) -> float | None:
        return self.metadata.get("reward_mean")

    @property
    def reward_std(self) -> float | None:
        return self.metadata.get("reward_std")

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def normalize(self, score: float) -> float | None:
        """(score - reward_mean) / reward_std when the checkpoint carries training statistics."""
        if self.reward_std is None or self.reward_mean is None or self.reward_std <= 0:
            return None
        return (score - self.reward_mean) / self.reward_std

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str | Path,
    *,
    version: str | None = None,
    dtype: str = "float32",
    max_tokens: int = 2048,
    device: str = "auto",
) -> LoadedModel:
    """Load and check a reward checkpoint: metadata, weights, tokenizer, and one finite trial score.

    Raises FileNotFoundError / ValueError / OSError (or anything ``from_pretrained`` raises) when the folder
    cannot serve; the caller keeps its current model in that case.
    """
    path = Path(path)
    metadata = read_reward_metadata(path)
    model = load_reward_model(path, dtype=DTYPES[dtype]).to(resolve_device(device))
    tokenizer = load_tokenizer(path)
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        max_tokens = min(max_tokens, int(context))
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=str(path),
        version=version or metadata["version"],
        metadata=metadata,
        dtype=dtype,
        max_tokens=max_tokens,
    )
    prompt_ids, response_ids = chat.tokenize_prompt_response(tokenizer, "Hello", "Hi.")
    vocab = model.config.vocab_size
    if max(prompt_ids + response_ids) >= vocab:
        raise ValueError(f"the tokenizer produces ids >= the model's vocab_size {vocab}")
    trial = score_sequences(loaded, [prompt_ids + response_ids])[0]
    if not math.isfinite(trial):
        raise ValueError(f"the model's trial score is {trial}")
    _check_prefix_sharing(loaded, prompt_ids, [response_ids, chat.encode_response(tokenizer, "Hello there!")])
    return loaded


def _check_prefix_sharing(loaded: LoadedModel, prompt_ids: list[int], responses: list[list[int]]) -> None:
    """Keep prefix sharing only if it reproduces the plain forward pass on a trial batch."""
    rows = [prompt_ids + r for r in responses]
    plain = [score_sequences(loaded, [row])[0] for row in rows]
    try:
        with torch.inference_mode():
            shared = _score_with_shared_prefix(
                loaded, rows, common_prefix_length(rows, own=1), next(loaded.model.parameters()).device
            )
        ok = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(shared, plain, strict=True))
        why = f"scores differ: {shared} vs {plain}"
    except Exception as exc:  # any architecture-specific failure just turns the optimisation off
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        loaded.prefix_sharing = False
        log.warning("%s: prefix sharing off (%s)", loaded.path, why)


# ---------------------------------------------------------------------------- requests -> (prompt, response)


def _check_text(text: str, field_name: str, max_chars: int, allow_empty: bool = True) -> str:
    require(allow_empty or bool(text), field_name, "empty")
    require(len(text) <= max_chars, field_name, f"{len(text)} chars > limit {max_chars}")
    return text


def _messages(messages, field_name: str, max_chars: int) -> list[dict]:
    out = []
    for j, m in enumerate(messages):
        where = f"{field_name}[{j}]"
        require(m.role in ROLES, f"{where}.role", f"{m.role!r} is not one of {', '.join(ROLES)}")
        _check_text(m.content, f"{where}.content", max_chars, allow_empty=m.role != "user")
        out.append({"role": m.role, "content": m.content})
    return out


def item_to_pair(item, field_name: str, max_chars: int) -> tuple[str | list[dict], str]:
    """A ``ScoreItem`` as (prompt, response text), validated; InvalidArgument names the bad field."""
    kind = item.WhichOneof("kind")
    if kind == "pair":
        pair = item.pair
        where = f"{field_name}.pair.prompt"
        prompt_kind = pair.prompt.WhichOneof("kind")
        if prompt_kind == "text":
            prompt = _check_text(pair.prompt.text, f"{where}.text", max_chars, allow_empty=False)
        elif prompt_kind == "chat":
            require(len(pair.prompt.chat.messages) > 0, f"{where}.chat.messages", "empty")
            prompt = _messages(pair.prompt.chat.messages, f"{where}.chat.messages", max_chars)
        elif prompt_kind == "tokens":
            raise InvalidArgument(f"{where}.tokens", "token ids are not accepted; send text or chat")
        else:
            raise InvalidArgument(where, "missing: set text or chat")
        return prompt, _check_text(pair.response, f"{field_name}.pair.response", max_chars)
    if kind == "conversation":
        where = f"{field_name}.conversation.messages"
        messages = _messages(item.conversation.messages, where, max_chars)
        try:
            return chat.split_conversation(messages)
        except ValueError as exc:
            raise InvalidArgument(where, str(exc)) from None
    raise InvalidArgument(field_name, "missing: set pair or conversation")


# ---------------------------------------------------------------------------- (prompt, response) -> token ids


@dataclass
class Encoded:
    """Token ids of one pair as the model reads them."""

    ids: list[int]
    truncated: bool = False


def encode_pair(
    tokenizer, prompt, response: str, *, max_tokens: int, truncation: str, field_name: str = "item"
) -> Encoded:
    """Prompt (chat template) + response + EOS, within ``max_tokens`` per the truncation policy."""
    prompt_ids, response_ids = chat.tokenize_prompt_response(tokenizer, prompt, response)
    total = len(prompt_ids) + len(response_ids)
    if total <= max_tokens:
        return Encoded(prompt_ids + response_ids)
    if truncation != TRUNCATE_LEFT:
        raise InvalidArgument(
            field_name, f"{total} tokens > limit {max_tokens} (truncation=reject; or use truncate_left)"
        )
    keep = max_tokens - len(response_ids)
    require(
        keep >= 1,
        field_name,
        f"the response alone is {len(response_ids)} tokens; limit {max_tokens} leaves no room for the prompt",
    )
    return Encoded(prompt_ids[-keep:] + response_ids, truncated=True)


def encode_request(loaded: LoadedModel, items, *, truncation: str, max_chars: int) -> list[Encoded]:
    """Validate and encode every item of a ScoreRequest (the first bad item raises InvalidArgument)."""
    out = []
    for i, item in enumerate(items):
        prompt, response = item_to_pair(item, f"items[{i}]", max_chars)
        out.append(
            encode_pair(
                loaded.tokenizer,
                prompt,
                response,
                max_tokens=loaded.max_tokens,
                truncation=truncation,
                field_name=f"items[{i}]",
            )
        )
    return out


# ---------------------------------------------------------------------------- token ids -> scores


def pad_batch(
    sequences: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), padded on ``side``."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "left":
            ids[row, longest - len(seq) :] = torch.tensor(seq)
            mask[row, longest - len(seq) :] = 1
        else:
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
    return ids, mask


def score_sequences(
    loaded: LoadedModel, sequences: list[list[int]], padding_side: str = "right", min_shared_prefix: int = 0
) -> list[float]:
    """One batch: the raw reward of each sequence.

    When the rows share a prefix of at least ``min_shared_prefix`` tokens (> 0; the chat template's system
    turn, or one prompt with several responses), the prefix runs once and its key/value cache is reused by
    every row, so the batch costs about ``prefix + sum(suffixes)`` tokens instead of ``sum(rows)``.
    """
    device = next(loaded.model.parameters()).device
    shared = common_prefix_length(sequences, own=1) if len(sequences) > 1 and min_shared_prefix > 0 else 0
    with torch.inference_mode():
        if shared >= min_shared_prefix > 0 and loaded.prefix_sharing:
            try:
                return _score_with_shared_prefix(loaded, sequences, shared, device)
            except (TypeError, ValueError, AttributeError, NotImplementedError) as exc:
                loaded.prefix_sharing = False  # this architecture cannot; plain batches from now on
                log.warning("prefix sharing disabled for %s: %s", loaded.version, exc)
        ids, mask = pad_batch(sequences, loaded.pad_token_id, padding_side)
        return reward_forward(loaded.model, ids.to(device), mask.to(device)).tolist()


def _score_with_shared_prefix(
    loaded: LoadedModel, sequences: list[list[int]], shared: int, device
) -> list[float]:
    model, rows = loaded.model, len(sequences)
    prefix = torch.tensor([sequences[0][:shared]], device=device)
    cache = model.base_model(input_ids=prefix, use_cache=True).past_key_values
    cache.batch_repeat_interleave(rows)
    ids, suffix_mask = pad_batch([s[shared:] for s in sequences], loaded.pad_token_id, "right")
    ids, suffix_mask = ids.to(device), suffix_mask.to(device)
    mask = torch.cat([torch.ones(rows, shared, dtype=suffix_mask.dtype, device=device), suffix_mask], dim=1)
    out = model.base_model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=shared + position_ids_from_mask(suffix_mask),
        past_key_values=cache,
        use_cache=True,
    )
    hidden = out.last_hidden_state
    last = hidden[torch.arange(rows, device=device), last_real_token_index(suffix_mask)]
    return score_head(model)(last).squeeze(-1).float().tolist()
