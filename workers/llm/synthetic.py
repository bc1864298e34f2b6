"""A synthetic LLM engine: deterministic tokens at a fixed step time.

For load tests and the barge-in benchmark, where the engine's own cost must be
known exactly; it checks the cancel watch between steps like the real engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from shared.cancel import CancelWatch
from shared.protocol import ChatMessage


class SyntheticLlm:
    deterministic = True

    def __init__(self, step_ms: float = 20.0, tokens: int = 40, reply: str | None = None, fail_with: str | None = None) -> None:
        self.step_s = step_ms / 1000
        self.tokens = tokens
        self.reply = reply
        self.fail_with = fail_with

    async def load(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def stream(
        self, messages: list[ChatMessage], *, request_id: str, max_tokens: int, watch: CancelWatch | None
    ) -> AsyncGenerator[str, None]:
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        last_user = next((m.text for m in reversed(messages) if m.role == "user"), "")
        words = (self.reply or f"You said: {last_user}.").split()
        for i in range(min(self.tokens, max_tokens)):
            if watch is not None and watch.cancelled:
                return
            await asyncio.sleep(self.step_s)
            if watch is not None and watch.cancelled:
                return
            yield (" " if i else "") + words[i % len(words)]
