"""A call's conversation context: owned by the bridge, mirrored into `vb:{sid}:ctx` for the workers.

The LLM workers read the context list from Redis; the bridge is its only
writer and keeps the same entries in memory. A Redis without persistence
comes back empty after a restart; the next write notices (RPUSHX finds no
list) and writes the whole conversation and the session's metadata again, so
the next turn is answered with everything said before.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from shared import metrics
from shared.protocol import Keys

log = logging.getLogger("voxbus.context")


class SessionContext:
    def __init__(self, redis: aioredis.Redis, sid: str, *, meta: bytes, system: bytes, ttl_s: int) -> None:
        self.redis = redis
        self.sid = sid
        self.meta = meta
        self.entries: list[bytes] = [system]
        self.ttl_s = ttl_s
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
            if not await self.redis.rpushx(Keys.ctx(self.sid), entry):
                await self._rewrite()

    async def remove(self, entry: bytes) -> None:
        """Drop the latest occurrence of `entry` (a speculative turn's user message)."""
        async with self._lock:
            for i in range(len(self.entries) - 1, 0, -1):
                if self.entries[i] == entry:
                    del self.entries[i]
                    break
            await self.redis.lrem(Keys.ctx(self.sid), -1, entry)

    async def _rewrite(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._write_all(pipe, keep_meta=True)
        await pipe.execute()
        metrics.CONTEXT_RESTORED.inc()
        log.warning("session %s: context was gone from Redis (restart?); wrote its %d entries again",
                    self.sid, len(self.entries))
