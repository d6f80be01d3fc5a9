"""One way to turn prompts and responses into tokens, shared by generation, scoring and training.

A prompt is plain text (sent as one user message) or a list of chat messages (``{"role", "content"}``); it is
rendered with the tokenizer's chat template and the generation prompt (``<|im_start|>assistant\\n`` for
ChatML). A response is the assistant's text followed by the EOS token (``<|im_end|>`` for ChatML), exactly the
tokens the policy samples. Prompt and response are tokenized separately, so the response tokens a trainer
scores are the ones the generation service returned.
"""

from __future__ import annotations

from collections.abc import Sequence

Messages = Sequence[dict]
PromptLike = str | Messages


def as_messages(prompt: PromptLike) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render_prompt(tokenizer, prompt: PromptLike) -> str:
    """The prompt as the model sees it, ending with the assistant's turn opening."""
    if tokenizer.chat_template is None:
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt) + "\n"
    return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: PromptLike) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if add_eos and tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def tokenize_prompt_response(
    tokenizer, prompt: PromptLike, response: str, add_eos: bool = True
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the rendered prompt and the response with its closing EOS."""
    return encode_prompt(tokenizer, prompt), encode_response(tokenizer, response, add_eos)


def split_conversation(messages: Messages) -> tuple[list[dict], str]:
    """A conversation ending with an assistant turn as (prompt messages, response text)."""
    messages = as_messages(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a conversation to score must end with an assistant message")
    if len(messages) < 2:
        raise ValueError("a conversation to score needs at least one message before the assistant's")
    return messages[:-1], messages[-1]["content"]


def strip_response(tokenizer, token_ids: Sequence[int]) -> str:
    """Decode sampled tokens to the response text (without EOS / special tokens)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)
