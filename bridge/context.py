"""A call's conversation context: owned by the bridge, mirrored into `vb:{sid}:ctx` for the workers.

The LLM workers read the context list from Redis; the bridge is its only
writer and keeps the same entries in memory. A Redis without persistence
comes back empty after a restart; the next write notices (RPUSHX finds no
list) and writes the whole conversation and the session's metadata again, so
the next turn is answered with everything said before.

The context is bounded (`max_messages`, `max_chars` after the system prompt).
Past a bound the oldest messages go in one chunk, down to half of it, not one
per turn: an LLM reuses its cache for the longest unchanged prefix of the
prompt (llama.cpp's KV cache, vLLM's prefix cache), so dropping one message
a turn would change the prefix every turn and re-read the whole conversation
each time (11.5 s per turn on llama.cpp past 2,048 tokens). Trimmed in
chunks, one turn in many pays for it and the others stay fast.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import redis.asyncio as aioredis

from shared import metrics
from shared.protocol import ChatMessage, Keys

log = logging.getLogger("voxbus.context")


class SessionContext:
    def __init__(self, redis: aioredis.Redis, sid: str, *, meta: bytes, system: bytes, ttl_s: int,
                 max_messages: int = 24, max_chars: int = 6000) -> None:
        self.redis = redis
        self.sid = sid
        self.meta = meta
        self.entries: list[bytes] = [system]
        self.ttl_s = ttl_s
        self.max_messages = max(2, max_messages)
        self.max_chars = max(200, max_chars)
        self.trims = 0
        self._chars: list[int] = [0]  # text length per entry (the system prompt does not count)
        self._lock = asyncio.Lock()  # one write at a time: Redis keeps the order of the entries here

    def open_into(self, pipe: aioredis.client.Pipeline) -> None:
        """The session's first write, as part of the bridge's session-opening pipeline."""
        self._write_all(pipe, keep_meta=False)

    def _write_all(self, pipe: aioredis.client.Pipeline, *, keep_meta: bool) -> None:
        pipe.set(Keys.meta(self.sid), self.meta, ex=self.ttl_s, nx=keep_meta)
        pipe.delete(Keys.ctx(self.sid))
        pipe.rpush(Keys.ctx(self.sid), *self.entries)
        pipe.expire(Keys.ctx(self.sid), self.ttl_s)

    async def append(self, entry: bytes) -> None:
        async with self._lock:
            self.entries.append(entry)
            self._chars.append(_text_chars(entry))
            if self._over():
                self._trim()
                await self._replace()
            elif not await self.redis.rpushx(Keys.ctx(self.sid), entry):  # type: ignore[arg-type]  # bytes are sent as-is
                await self._rewrite()

    def _over(self) -> bool:
        return len(self.entries) - 1 > self.max_messages or sum(self._chars) > self.max_chars

    def _trim(self) -> None:
        """Drop the oldest messages, in one chunk, down to half of each bound (never the last one)."""
        keep_messages, keep_chars = self.max_messages // 2, self.max_chars // 2
        first = 1
        while first < len(self.entries) - 1 and (
                len(self.entries) - first > keep_messages or sum(self._chars[first:]) > keep_chars):
            first += 1
        # Start at a user message: a reply without its question confuses models and chat templates.
        while first < len(self.entries) - 1 and _role(self.entries[first]) != "user":
            first += 1
        del self.entries[1:first]
        del self._chars[1:first]
        self.trims += 1
        metrics.CONTEXT_TRIMS.inc()

    async def _replace(self) -> None:
        """The whole list at once (MULTI/EXEC): a worker reading it never sees it half written."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(Keys.ctx(self.sid))
        pipe.rpush(Keys.ctx(self.sid), *self.entries)
        pipe.expire(Keys.ctx(self.sid), self.ttl_s)
        await pipe.execute()

    async def remove(self, entry: bytes) -> None:
        """Drop the latest occurrence of `entry` (a speculative turn's user message)."""
        async with self._lock:
            for i in range(len(self.entries) - 1, 0, -1):
                if self.entries[i] == entry:
                    del self.entries[i]
                    del self._chars[i]
                    break
            await self.redis.lrem(Keys.ctx(self.sid), -1, entry)  # type: ignore[arg-type]  # bytes are sent as-is

    async def _rewrite(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._write_all(pipe, keep_meta=True)
        await pipe.execute()
        metrics.CONTEXT_RESTORED.inc()
        log.warning("session %s: context was gone from Redis (restart?); wrote its %d entries again",
                    self.sid, len(self.entries))


_decoder = msgspec.msgpack.Decoder(ChatMessage)


def _text_chars(entry: bytes) -> int:
    try:
        return len(_decoder.decode(entry).text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return len(entry)


def _role(entry: bytes) -> str:
    try:
        return _decoder.decode(entry).role
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
