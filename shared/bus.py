"""The bus client: batched stream publishing and multiplexed stream reading.

`BatchPublisher` coalesces every XADD issued within one event-loop tick (across
all sessions) into one pipelined round trip; while a round trip is in flight the
next batch accumulates. `StreamMux` reads any number of streams with one XREAD
per round, so a bridge holding hundreds of sessions needs one reader task, not
one per session. Both survive Redis restarts with back-off instead of crashing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import metrics
from .protocol import (
    ENTRY_FIELD,
    MAX_ENTRY_BYTES,
    STREAM_TYPES,
    AnyMessage,
    DeadLetter,
    Keys,
    Message,
    ProtocolError,
    decode_entry,
    encode,
    maxlen_for,
)
from .redis_conn import TRANSIENT_ERRORS, Backoff

log = logging.getLogger("voxbus.bus")

DUPLICATE_ID_ERROR = "equal or smaller than the target stream top item"


def stream_kind(key: str) -> str:
    return key.rsplit(":", 1)[-1]


def session_of(key: str) -> str | None:
    """The session id inside a per-session key's hash tag, or None."""
    start, end = key.find("{"), key.find("}")
    return key[start + 1 : end] if 0 <= start < end else None


class BatchPublisher:
    """Pipelines XADDs: everything published in the same tick goes in one round trip.

    A batch that fails on a connection error is retried whole after back-off,
    so nothing is lost; a retried batch may land twice, which consumers absorb
    because every output carries (turn, seq).
    """

    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 4096, max_buffer: int = 200_000) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._max_buffer = max_buffer
        self._buf: list[tuple[str, bytes, int, str, asyncio.Future[bytes | None]]] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def publish_nowait(
        self, key: str, msg: Message, maxlen: int | None = None, entry_id: str = "*"
    ) -> asyncio.Future[bytes | None]:
        """Queue one XADD; the future resolves to the entry id once Redis has it, or to
        None when an explicit `entry_id` was already taken (a duplicate, dropped)."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="voxbus-publisher")
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._buf.append((key, encode(msg), maxlen or maxlen_for(key), entry_id, fut))
        self._wake.set()
        if len(self._buf) >= self._max_buffer:
            self._room.clear()
        return fut

    async def publish(self, key: str, msg: Message, maxlen: int | None = None, entry_id: str = "*") -> bytes | None:
        await self._room.wait()
        return await self.publish_nowait(key, msg, maxlen, entry_id)

    async def publish_many(self, items: list[tuple[str, Message]]) -> list[bytes | None]:
        await self._room.wait()
        return list(await asyncio.gather(*(self.publish_nowait(k, m) for k, m in items)))

    async def flush(self) -> None:
        """Wait until everything queued so far is in Redis."""
        pending = [f for *_, f in self._buf]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        self._closed = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buf:
                batch = self._buf[: self._max_batch]
                pipe = self._redis.pipeline(transaction=False)
                for key, data, maxlen, entry_id, _ in batch:
                    pipe.xadd(key, {ENTRY_FIELD: data}, id=entry_id, maxlen=maxlen, approximate=True)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except TRANSIENT_ERRORS as exc:
                    metrics.BUS_RECONNECTS.labels("publisher").inc()
                    log.warning("publish of %d entries failed (%s); retrying", len(batch), exc)
                    await backoff.sleep()
                    continue
                except Exception as exc:  # not retryable: fail this batch's callers, keep serving
                    log.exception("publish of %d entries failed", len(batch))
                    results = [exc] * len(batch)
                backoff.reset()
                del self._buf[: len(batch)]
                if len(self._buf) < self._max_buffer:
                    self._room.set()
                for (key, _, _, _, fut), res in zip(batch, results):
                    if fut.done():
                        continue
                    if isinstance(res, ResponseError) and DUPLICATE_ID_ERROR in str(res):
                        metrics.BUS_DUPLICATES.labels(stream_kind(key)).inc()
                        fut.set_result(None)
                    elif isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        metrics.BUS_PUBLISHED.labels(stream_kind(key)).inc()
                        fut.set_result(res)


@dataclass(slots=True)
class Received:
    key: str
    entry_id: bytes
    msg: AnyMessage


async def dead_letter(redis: aioredis.Redis, dlq: str, letter: DeadLetter, kind: str) -> None:
    """Append a rejected entry to a dead-letter stream (bounded) and count it."""
    await redis.xadd(dlq, {ENTRY_FIELD: encode(letter)}, maxlen=maxlen_for(dlq), approximate=True)
    metrics.BUS_DEAD_LETTERED.labels(kind).inc()


def check_entry(key: str, fields: dict[bytes, bytes]) -> AnyMessage:
    """Decode an entry of a per-session stream and check it belongs there.

    Raises ProtocolError when the entry is malformed, of a type this stream does
    not carry, or names another session than the stream's.
    """
    msg = decode_entry(fields)
    allowed = STREAM_TYPES.get(stream_kind(key))
    if allowed is not None and not isinstance(msg, allowed):
        raise ProtocolError(f"{type(msg).__name__} does not belong in a {stream_kind(key)} stream")
    sid = session_of(key)
    if sid is not None and msg.session != sid:
        raise ProtocolError(f"entry names session {msg.session!r} but sits in {sid!r}'s stream")
    return msg


class StreamMux:
    """Reads many streams through one XREAD call per round.

    Streams can be added and removed at any time; a stream added while a read
    is blocked is picked up when that read returns (at most `block_ms` later),
    and nothing is missed because positions are tracked per stream. Entries
    that do not decode or do not belong to their stream go to `Keys.DLQ`.
    """

    def __init__(
        self, redis: aioredis.Redis, *, block_ms: int = 50, count: int = 256, shard_size: int = 512
    ) -> None:
        self._redis = redis
        self._block_ms = block_ms
        self._count = count
        self._shard = shard_size
        self._pos: dict[str, bytes | str] = {}
        self._backoff = Backoff()

    def __contains__(self, key: str) -> bool:
        return key in self._pos

    def __len__(self) -> int:
        return len(self._pos)

    async def add(self, key: str, last_id: str = "$") -> None:
        """Follow `key` from after `last_id` ("$" = only entries added from now on)."""
        if last_id == "$":
            newest = await self._redis.xrevrange(key, count=1)
            last_id = newest[0][0] if newest else "0-0"
        self._pos[key] = last_id

    def remove(self, key: str) -> None:
        self._pos.pop(key, None)

    async def read(self) -> list[Received]:
        """One round: entries from all followed streams (blocks up to block_ms if none)."""
        if not self._pos:
            await asyncio.sleep(self._block_ms / 1000)
            return []
        keys = list(self._pos)
        shards = [keys[i : i + self._shard] for i in range(0, len(keys), self._shard)]
        try:
            if len(shards) == 1:
                replies = [await self._xread(shards[0])]
            else:
                replies = await asyncio.gather(*(self._xread(s) for s in shards))
        except TRANSIENT_ERRORS as exc:
            metrics.BUS_RECONNECTS.labels("reader").inc()
            log.warning("stream read failed (%s); retrying", exc)
            await self._backoff.sleep()
            return []
        self._backoff.reset()
        out: list[Received] = []
        for reply in replies:
            for raw_key, entries in reply or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                if key not in self._pos:
                    continue
                for entry_id, fields in entries:
                    self._pos[key] = entry_id
                    try:
                        out.append(Received(key, entry_id, check_entry(key, fields)))
                    except ProtocolError as exc:
                        await self._reject(key, entry_id, fields, str(exc))
        return out

    async def _xread(self, keys: list[str]):
        return await self._redis.xread({k: self._pos[k] for k in keys}, count=self._count, block=self._block_ms)

    async def _reject(self, key: str, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        kind = stream_kind(key)
        metrics.BUS_REJECTED.labels(kind, reason.split(":")[0][:40]).inc()
        payload = fields.get(ENTRY_FIELD) or b"".join(k + b"=" + v for k, v in fields.items())
        letter = DeadLetter(
            source=key, entry_id=entry_id.decode(), reason=reason, payload=payload[:MAX_ENTRY_BYTES]
        )
        try:
            await dead_letter(self._redis, Keys.DLQ, letter, kind)
        except (ResponseError, *TRANSIENT_ERRORS) as exc:  # the rejection is still counted
            log.warning("could not dead-letter entry %s of %s: %s", entry_id, key, exc)

    async def __aiter__(self):
        while True:
            for item in await self.read():
                yield item
