"""Checking Generate requests and turning them into token ids and sampling parameters (no server needed).

Every problem raises InvalidArgument with the field's path first (``prompts[2].chat.messages[0].role: ...``).
Prompts are formatted by rlhf.core.chat (the one formatting every service and trainer uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf.core.chat import encode_prompt, render_prompt
from rlhf.core.errors import InvalidArgument, require
from rlhf.generation.sampling import MODE_SAMPLING, MODE_TEMPERATURE, SamplingParams
from rlhf.v1 import policy_pb2

ROLES = ("system", "user", "assistant")
MAX_N = 64
MAX_STOP = 8
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 10.0
MAX_REQUEST_ID_CHARS = 256
CHARS_PER_TOKEN_LIMIT = 32  # texts longer than max_prompt_tokens x this are refused before tokenizing

LOGPROBS_MODES = {
    policy_pb2.LOGPROBS_MODE_UNSPECIFIED: MODE_SAMPLING,
    policy_pb2.LOGPROBS_MODE_SAMPLING: MODE_SAMPLING,
    policy_pb2.LOGPROBS_MODE_TEMPERATURE: MODE_TEMPERATURE,
}


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_prompt_tokens: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    vocab_size: int
    context_length: int | None = None  # the model's max_position_embeddings, when known


@dataclass
class PreparedRequest:
    """A checked request: token ids per prompt, the text each was rendered to, and the sampling parameters."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    params: SamplingParams
    min_policy_version: int = 0
    request_id: str = ""
    return_prompt_token_ids: bool = False

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_ids) * self.params.n


def check_params(params: policy_pb2.SamplingParams, limits: Limits) -> SamplingParams:
    max_new = params.max_new_tokens or min(limits.default_max_new_tokens, limits.max_new_tokens_limit)
    require(
        max_new <= limits.max_new_tokens_limit,
        "params.max_new_tokens",
        f"{max_new} > limit {limits.max_new_tokens_limit}",
    )
    temperature = params.temperature if params.HasField("temperature") else 1.0
    require(math.isfinite(temperature), "params.temperature", "not a finite number")
    require(
        0.0 <= temperature <= MAX_TEMPERATURE,
        "params.temperature",
        f"{temperature:g} outside [0, {MAX_TEMPERATURE:g}]",
    )
    top_p = params.top_p
    require(math.isfinite(top_p), "params.top_p", "not a finite number")
    require(0.0 <= top_p <= 1.0, "params.top_p", f"{top_p:g} outside (0, 1] (0 = unset = 1)")
    n = params.n or 1
    require(n <= MAX_N, "params.n", f"{n} > limit {MAX_N}")
    require(
        len(params.stop) <= MAX_STOP, "params.stop", f"{len(params.stop)} stop strings > limit {MAX_STOP}"
    )
    for i, s in enumerate(params.stop):
        require(s != "", f"params.stop[{i}]", "empty")
        require(len(s) <= MAX_STOP_CHARS, f"params.stop[{i}]", f"{len(s)} chars > limit {MAX_STOP_CHARS}")
    mode = LOGPROBS_MODES.get(params.logprobs_mode)
    require(mode is not None, "params.logprobs_mode", f"unknown value {params.logprobs_mode}")
    return SamplingParams(
        max_new_tokens=int(max_new),
        temperature=float(temperature),
        top_p=float(top_p) if top_p > 0 else 1.0,
        top_k=int(params.top_k),
        seed=int(params.seed) if params.HasField("seed") else None,
        stop=tuple(params.stop),
        n=int(n),
        logprobs_mode=mode,
    )


def _check_prompt(prompt, i: int, tokenizer, limits: Limits) -> tuple[list[int], str]:
    field = f"prompts[{i}]"
    kind = prompt.WhichOneof("kind")
    max_chars = limits.max_prompt_tokens * CHARS_PER_TOKEN_LIMIT
    if kind is None:
        raise InvalidArgument(field, "empty prompt: set text, chat or tokens")
    if kind == "tokens":
        ids = list(prompt.tokens.ids)
        require(len(ids) > 0, f"{field}.tokens.ids", "empty")
        for j, t in enumerate(ids):
            require(
                t < limits.vocab_size, f"{field}.tokens.ids[{j}]", f"{t} >= vocab_size {limits.vocab_size}"
            )
        text = tokenizer.decode(ids, skip_special_tokens=False)
    elif kind == "text":
        require(prompt.text.strip() != "", f"{field}.text", "empty")
        require(
            len(prompt.text) <= max_chars, f"{field}.text", f"{len(prompt.text)} chars > limit {max_chars}"
        )
        text = render_prompt(tokenizer, prompt.text)
        ids = encode_prompt(tokenizer, prompt.text)
    else:
        messages = prompt.chat.messages
        require(len(messages) > 0, f"{field}.chat.messages", "empty conversation")
        total = 0
        for j, msg in enumerate(messages):
            mfield = f"{field}.chat.messages[{j}]"
            require(msg.role in ROLES, f"{mfield}.role", f"{msg.role!r} is not one of {', '.join(ROLES)}")
            require(msg.role != "user" or msg.content.strip() != "", f"{mfield}.content", "empty user turn")
            total += len(msg.content)
        require(total <= max_chars, f"{field}.chat", f"{total} chars > limit {max_chars}")
        chat = [{"role": msg.role, "content": msg.content} for msg in messages]
        text = render_prompt(tokenizer, chat)
        ids = encode_prompt(tokenizer, chat)
    require(len(ids) > 0, field, "renders to no tokens")
    require(
        len(ids) <= limits.max_prompt_tokens,
        field,
        f"{len(ids)} tokens > max_prompt_tokens {limits.max_prompt_tokens}",
    )
    return ids, text


def prepare_request(request, tokenizer, limits: Limits) -> PreparedRequest:
    """Check a GenerateRequest / GenerateStreamRequest; raise InvalidArgument naming the first bad field."""
    params = check_params(request.params, limits)
    require(len(request.prompts) > 0, "prompts", "at least one prompt is required")
    sequences = len(request.prompts) * params.n
    require(
        sequences <= limits.max_batch_size,
        "prompts",
        f"{len(request.prompts)} prompts x n={params.n} = {sequences} sequences > max_batch_size "
        f"{limits.max_batch_size}",
    )
    require(request.min_policy_version >= 0, "min_policy_version", "negative")
    require(
        len(request.request_id) <= MAX_REQUEST_ID_CHARS,
        "request_id",
        f"{len(request.request_id)} chars > limit {MAX_REQUEST_ID_CHARS}",
    )
    prompt_ids, texts = [], []
    for i, prompt in enumerate(request.prompts):
        ids, text = _check_prompt(prompt, i, tokenizer, limits)
        if limits.context_length:
            require(
                len(ids) + params.max_new_tokens <= limits.context_length,
                "params.max_new_tokens",
                f"prompts[{i}] has {len(ids)} tokens; + {params.max_new_tokens} new tokens > the model's "
                f"context of {limits.context_length}",
            )
        prompt_ids.append(ids)
        texts.append(text)
    return PreparedRequest(
        prompt_ids,
        texts,
        params,
        min_policy_version=int(request.min_policy_version),
        request_id=request.request_id,
        return_prompt_token_ids=bool(getattr(request, "return_prompt_token_ids", False)),
    )
