"""Turns a session's context (ChatMessage list) into OpenAI-style chat dicts.

The configured system prompt always comes first and byte-identical, so every
engine with prefix caching (llama.cpp's KV-cache reuse, vLLM's prefix cache,
hosted APIs' prompt caching) keeps it warm across turns. Empty messages (an
assistant turn interrupted before any of it was heard) are dropped, and
consecutive messages of one role are merged (appended, so the cached prefix
still matches): many chat templates insist on alternating turns and on a
single leading system message.
"""

from __future__ import annotations

from shared.protocol import ChatMessage

ChatDict = dict[str, str]


def to_chat(messages: list[ChatMessage], system_prompt: str | None = None) -> list[ChatDict]:
    chat: list[ChatDict] = []
    if system_prompt:
        chat.append({"role": "system", "content": system_prompt})
    for msg in messages:
        text = msg.text.strip()
        if not text:
            continue
        if msg.role == "system" and system_prompt is not None and text == system_prompt.strip():
            continue  # the context repeats the configured prompt: it is already first
        if chat and chat[-1]["role"] == msg.role:
            chat[-1] = {"role": msg.role, "content": f"{chat[-1]['content']}\n{text}"}
        else:
            chat.append({"role": msg.role, "content": text})
    return chat
