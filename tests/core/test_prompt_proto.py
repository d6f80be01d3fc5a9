"""The one builder of the wire's Prompt message, shared by the generation, reward and feedback clients."""

from __future__ import annotations

from rlhf.core.prompt_proto import make_messages, make_prompt
from rlhf.v1 import common_pb2


def test_text_chat_and_token_prompts_become_their_kind_of_prompt_message():
    assert make_prompt("Tell a joke.").text == "Tell a joke."
    chat = make_prompt([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}])
    assert chat.WhichOneof("kind") == "chat"
    assert [(m.role, m.content) for m in chat.chat.messages] == [("system", "Be kind."), ("user", "Hi")]
    assert list(make_prompt([5, 7, 9]).tokens.ids) == [5, 7, 9]


def test_a_prompt_message_passes_through_and_messages_keep_their_order():
    message = common_pb2.Prompt(text="as is")
    assert make_prompt(message) is message
    messages = make_messages({"role": "user", "content": str(i)} for i in range(3))
    assert [m.content for m in messages] == ["0", "1", "2"]
