"""Request checking without a server: every problem names its field."""

from __future__ import annotations

import pytest

from rlhf.core.errors import InvalidArgument
from rlhf.core.models import build_tiny_tokenizer
from rlhf.generation.validation import Limits, prepare_request
from rlhf.v1 import common_pb2, policy_pb2

LIMITS = Limits(
    max_batch_size=4, max_prompt_tokens=32, max_new_tokens_limit=16, default_max_new_tokens=64, vocab_size=384
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def request(*prompts, **params):
    return policy_pb2.GenerateRequest(prompts=list(prompts), params=policy_pb2.SamplingParams(**params))


def text(t):
    return common_pb2.Prompt(text=t)


def chat(*pairs):
    return common_pb2.Prompt(
        chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in pairs])
    )


@pytest.mark.parametrize(
    "req,message",
    [
        (request(text("a"), max_new_tokens=17), "params.max_new_tokens: 17 > limit 16"),
        (request(max_new_tokens=4), "prompts: at least one prompt is required"),
        (
            request(text("a"), max_new_tokens=4, n=5),
            "prompts: 1 prompts x n=5 = 5 sequences > max_batch_size 4",
        ),
        (request(text(" "), max_new_tokens=4), "prompts[0].text: empty"),
        (request(text("a"), common_pb2.Prompt(), max_new_tokens=4), "prompts[1]: empty prompt"),
        (
            request(chat(("bot", "x")), max_new_tokens=4),
            "prompts[0].chat.messages[0].role: 'bot' is not one of",
        ),
        (
            request(chat(("user", "")), max_new_tokens=4),
            "prompts[0].chat.messages[0].content: empty user turn",
        ),
        (request(text("cat " * 40), max_new_tokens=4), "prompts[0]: "),
        (
            request(common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=[1, 999])), max_new_tokens=4),
            "prompts[0].tokens.ids[1]: 999 >= vocab_size 384",
        ),
        (request(text("a"), max_new_tokens=4, temperature=float("nan")), "params.temperature: not a finite"),
        (request(text("a"), max_new_tokens=4, temperature=11), "params.temperature: 11 outside"),
        (request(text("a"), max_new_tokens=4, top_p=1.5), "params.top_p: 1.5 outside"),
        (request(text("a"), max_new_tokens=4, stop=[""]), "params.stop[0]: empty"),
        (request(text("a"), max_new_tokens=4, logprobs_mode=9), "params.logprobs_mode: unknown value 9"),
    ],
)
def test_problems_name_their_field(tok, req, message):
    with pytest.raises(InvalidArgument) as info:
        prepare_request(req, tok, LIMITS)
    assert info.value.message.startswith(message), info.value.message


def test_a_good_request_is_rendered_with_the_chat_template(tok):
    prepared = prepare_request(request(text("hello"), chat(("user", "hi")), n=2), tok, LIMITS)
    assert prepared.num_sequences == 4
    assert prepared.params.max_new_tokens == 16  # 0 = the server default, capped by the limit
    assert prepared.prompt_texts[0] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert prepared.params.temperature == 1.0 and prepared.params.top_p == 1.0
    assert prepared.params.logprobs_mode == "sampling"  # LOGPROBS_MODE_UNSPECIFIED = SAMPLING (proto)
