"""`StreamMux`: any number of streams read through one reader, one round at a time.

A bridge holding hundreds of sessions needs one reader task, not one per
session. Streams can be added and removed at any time; one added while a read
is blocked is picked up when that read returns (at most `block_ms` later), and
nothing is missed because positions are tracked per stream. How a round reads
depends on the topology (`nodes.py`: one XREAD over up to `shard_size`
streams on one server, one per hash slot on a cluster); what it does with the
entries does not: every entry is decoded and checked against its stream, and
one that does not belong goes to `Keys.DLQ`, counted by its RejectReason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .. import metrics
from ..logs import RateLimitedLog
from ..protocol import AnyMessage, Keys, ProtocolError
from ..redis_conn import TRANSIENT_ERRORS, Backoff
from .entries import check_entry, count_rejected, dead_letter, field_map, letter_for, stream_kind
from .nodes import BusNode, node_for
from .wire import as_bytes

log = logging.getLogger("voxbus.bus")
_limited = RateLimitedLog(log)


@dataclass(slots=True)
class Received:
    key: str
    entry_id: bytes
    msg: AnyMessage


class StreamMux:
    def __init__(self, redis: aioredis.Redis, *, block_ms: int = 50, count: int = 256, shard_size: int = 512,
                 cluster_poll_ms: float = 5.0, node: BusNode | None = None) -> None:
        self._redis = redis
        self._node = node or node_for(redis, shard_size=shard_size, cluster_poll_ms=cluster_poll_ms)
        self._block_ms = block_ms
        self._count = count
        self._pos: dict[str, bytes | str] = {}
        self._names: dict[bytes, str] = {}
        self._backoff = Backoff()
        self._reading = asyncio.Lock()  # one round at a time on the node's connection(s)

    def __contains__(self, key: str) -> bool:
        return key in self._pos

    def __len__(self) -> int:
        return len(self._pos)

    async def add(self, key: str, last_id: str = "$") -> None:
        """Follow `key` from after `last_id` ("$" = only entries added from now on)."""
        position: bytes | str = last_id
        if last_id == "$":
            newest = cast(list[Any], await self._redis.xrevrange(key, count=1))
            position = newest[0][0] if newest else "0-0"
        self._names[key.encode()] = key
        self._pos[key] = position
        self._node.follow(key)

    def remove(self, key: str) -> None:
        if self._pos.pop(key, None) is not None:
            self._node.forget(key)
        self._names.pop(key.encode(), None)

    async def aclose(self) -> None:
        """Give back the connection(s) held for reading."""
        await self._node.aclose()

    async def read(self) -> list[Received]:
        """One round: entries from all followed streams (blocks up to block_ms if none)."""
        if not self._pos:
            await asyncio.sleep(self._block_ms / 1000)
            return []
        try:
            async with self._reading:
                # list(...): a stream removed while the round awaits must not be named; nodes pack the
                # positions before their first await, so the live dict is safe to pass.
                replies = await self._node.read(list(self._pos), self._pos, self._count, self._block_ms)
        except TRANSIENT_ERRORS as exc:
            metrics.BUS_RECONNECTS.labels("reader").inc()
            _limited.warning("read", "stream read failed (%s); retrying", exc)
            await self._node.reset()
            await self._backoff.sleep()
            return []
        self._backoff.reset()
        out: list[Received] = []
        rejected: list[tuple[str, bytes, dict[bytes, bytes], ProtocolError]] = []
        for raw_key, entries in replies:
            self._take(raw_key, entries, out, rejected)
        for rejection in rejected:
            await self._reject(*rejection)
        return out

    def _take(self, raw_key: bytes | str, entries: list[Any], out: list[Received], rejected: list[Any]) -> None:
        """Decode one stream's entries into `out` (bad ones into `rejected`) and move its position."""
        key = self._names.get(raw_key) if isinstance(raw_key, bytes) else raw_key
        if key is None or key not in self._pos or not entries:
            return
        self._pos[key] = entries[-1][0]
        for entry_id, raw_fields in entries:
            fields = field_map(raw_fields)
            try:
                out.append(Received(key, entry_id, check_entry(key, fields)))
            except ProtocolError as exc:
                rejected.append((key, entry_id, fields, exc))

    async def _reject(self, key: str, entry_id: bytes, fields: dict[bytes, bytes], exc: ProtocolError) -> None:
        kind = stream_kind(key)
        count_rejected(kind, exc.reason)
        letter = letter_for(key, as_bytes(entry_id).decode(), fields, str(exc))
        try:
            await dead_letter(self._redis, Keys.DLQ, letter, kind)
        except (ResponseError, *TRANSIENT_ERRORS) as err:  # the rejection is still counted
            _limited.warning("dlq", "could not dead-letter entry %s of %s: %s", entry_id, key, err)

    async def __aiter__(self) -> AsyncIterator[Received]:
        while True:
            for item in await self.read():
                yield item
