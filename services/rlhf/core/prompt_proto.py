"""The one builder of the wire's ``Prompt`` message, used by every client (generation, reward, feedback).

``rlhf.core.chat`` turns a plain prompt (text or chat messages) into tokens and stays free of protobuf: the
trainers' tokenization and the reward model's forward import it. This module is its wire-side twin: the
same plain prompt (or token ids) as a ``rlhf.v1.common_pb2.Prompt``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rlhf.v1 import common_pb2


def make_messages(messages: Iterable[Mapping]) -> list[common_pb2.ChatMessage]:
    """ChatMessage protos from {"role", "content"} dicts."""
    return [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def make_prompt(prompt) -> common_pb2.Prompt:
    """A Prompt proto from text, chat messages ([{"role", "content"}]), token ids ([int]) or a Prompt."""
    if isinstance(prompt, common_pb2.Prompt):
        return prompt
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    items = list(prompt)
    if items and all(isinstance(x, int) for x in items):
        return common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=items))
    return common_pb2.Prompt(chat=common_pb2.Conversation(messages=make_messages(items)))
