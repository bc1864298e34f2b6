"""`BatchPublisher`: every XADD issued within one event-loop tick, across all sessions, in one write.

Batches go out as soon as they form, without waiting for the replies of the
batches before them (up to the node's `max_in_flight`, see `nodes.py`). A
connection error sends every unanswered entry again, in order, after a
jittered back-off, so nothing is lost; an entry sent twice that way is refused
by Redis when its id is explicit (every output carries (turn, seq)). An entry
Redis refuses (OOM, WRONGTYPE) fails alone: its caller's future gets the
error, the rest of its batch lands.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .. import metrics
from ..logs import RateLimitedLog
from ..protocol import Message, encode, maxlen_for
from ..redis_conn import TRANSIENT_ERRORS, Backoff
from ..tasks import finish_task
from .entries import stream_kind
from .nodes import BusNode, node_for

log = logging.getLogger("voxbus.bus")
_limited = RateLimitedLog(log)

DUPLICATE_ID_ERROR = "equal or smaller than the target stream top item"

# (key, encoded message, MAXLEN ~ bound, entry id or "*", the caller's future)
_Pending = tuple[str, bytes, int, str, "asyncio.Future[bytes | None]"]


class BatchPublisher:
    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 4096, max_buffer: int = 200_000,
                 node: BusNode | None = None) -> None:
        self._node = node or node_for(redis)
        self._max_batch = max_batch
        self._max_buffer = max_buffer
        # Unsettled entries, oldest first; the first `_sent` are on the wire, in the batches of `_in_flight`.
        self._buf: list[_Pending] = []
        self._sent = 0
        self._in_flight: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._backoff = Backoff()
        self._batches = self._entries = self._max_seen = 0
        # Called for every entry queued, with its key, message and future: a public hook for
        # measurements (ops/bench/capacity.py stamps each frame's acknowledgement); None costs nothing.
        self.observer: Callable[[str, Message, asyncio.Future[bytes | None]], None] | None = None

    def publish_nowait(
        self, key: str, msg: Message, maxlen: int | None = None, entry_id: str = "*"
    ) -> asyncio.Future[bytes | None]:
        """Queue one XADD; the future resolves to the entry id once Redis has it, or to None when an
        explicit `entry_id` was already taken (a duplicate, dropped)."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run(), name="voxbus-publisher")
        fut: asyncio.Future[bytes | None] = loop.create_future()
        self._buf.append((key, encode(msg), maxlen or maxlen_for(key), entry_id, fut))
        if self.observer is not None:
            self.observer(key, msg, fut)
        self._wake.set()
        if len(self._buf) >= self._max_buffer:
            self._room.clear()
        return fut

    async def publish(self, key: str, msg: Message, maxlen: int | None = None, entry_id: str = "*") -> bytes | None:
        await self._room.wait()
        return await self.publish_nowait(key, msg, maxlen, entry_id)

    @property
    def backlog(self) -> int:
        """Entries queued or sent and not answered yet."""
        return len(self._buf)

    async def flush(self) -> None:
        """Wait until everything queued so far is in Redis (or refused)."""
        pending = [item[-1] for item in self._buf]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def aclose(self) -> None:
        await self.flush()
        self._closed = True
        if self._task:
            await finish_task(self._task, grace_s=0)
        await self._node.aclose()

    def stats(self) -> dict[str, float]:
        """Batches answered, entries in them, the largest batch and the mean."""
        mean = self._entries / self._batches if self._batches else 0.0
        return {"batches": self._batches, "entries": self._entries, "max_batch": self._max_seen,
                "mean_batch": round(mean, 2)}

    # ------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while True:
            if self._sent < len(self._buf) and len(self._in_flight) < self._node.max_in_flight:
                await self._send_next()
                continue
            if self._in_flight:
                await self._settle_first()
                continue
            await self._wake.wait()
            self._wake.clear()

    async def _send_next(self) -> None:
        start = self._sent
        batch = self._buf[start : start + self._max_batch]
        try:
            fut = await self._node.send([(k, d, n, i) for k, d, n, i, _ in batch])
        except Exception as exc:
            await self._connection_lost(exc)
            return
        self._sent += len(batch)
        self._in_flight.append((len(batch), fut))

    async def _settle_first(self) -> None:
        """Wait for the oldest batch in flight (or for more to send, if the node takes more)."""
        n, fut = self._in_flight[0]
        if not fut.done():
            if self._sent < len(self._buf) and len(self._in_flight) < self._node.max_in_flight:
                waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait([fut, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                self._wake.clear()
                if not fut.done():
                    return
            else:
                await asyncio.wait({fut})
        try:
            results = fut.result()
        except Exception as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                await self._connection_lost(exc)
                return
            # A reply that could not be read: that batch fails, the ones after it go again.
            log.exception("reading the replies of %d entries failed", n)
            self._in_flight.popleft()
            batch, self._buf[:n] = self._buf[:n], []
            self._sent -= n
            await self._connection_lost(exc, quiet=True)
            self._settle(batch, [exc] * n)
            return
        self._in_flight.popleft()
        batch = self._buf[:n]
        retry = [item for item, res in zip(batch, results) if isinstance(res, TRANSIENT_ERRORS)]
        del self._buf[:n]
        self._sent -= n
        if retry:
            # Some entries were lost with one master of a cluster: they go again, first, in order.
            done = [(item, res) for item, res in zip(batch, results) if not isinstance(res, TRANSIENT_ERRORS)]
            self._buf[self._sent : self._sent] = retry
            self._settle([item for item, _ in done], [res for _, res in done])
            await self._connection_lost(next(r for r in results if isinstance(r, TRANSIENT_ERRORS)))
            return
        self._backoff.reset()
        self._settle(batch, results)

    async def _connection_lost(self, exc: BaseException, quiet: bool = False) -> None:
        """Every entry not answered goes again, in order, after a jittered back-off."""
        if not quiet:
            metrics.BUS_RECONNECTS.labels("publisher").inc()
            _limited.warning("publish-retry", "publish of %d entries failed (%s); retrying", len(self._buf), exc)
        for _, fut in self._in_flight:
            fut.cancel()
        self._in_flight.clear()
        self._sent = 0
        await self._node.reset()
        if not quiet:
            await self._backoff.sleep()

    def _settle(self, batch: list[_Pending], results: list[Any]) -> None:
        """Resolve each caller's future; metrics are counted once per batch, not per entry."""
        if len(self._buf) < self._max_buffer:
            self._room.set()
        published: Counter[str] = Counter()
        duplicates: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        first_failure: Exception | None = None
        for (key, _, _, _, fut), res in zip(batch, results):
            if fut.done():
                continue
            if isinstance(res, ResponseError) and DUPLICATE_ID_ERROR in str(res):
                duplicates[key] += 1
                fut.set_result(None)
            elif isinstance(res, Exception):
                failed[key] += 1
                first_failure = first_failure or res
                fut.set_exception(res)
                fut.exception()  # retrieved: fire-and-forget callers (caller frames) log no traceback each
            else:
                published[key] += 1
                fut.set_result(res)
        _count_by_kind(metrics.BUS_PUBLISHED, published)
        _count_by_kind(metrics.BUS_DUPLICATES, duplicates)
        if failed:  # refused by Redis (an error reply, not a lost connection: those are retried)
            _count_by_kind(metrics.BUS_PUBLISH_FAILED, failed)
            _limited.warning(f"refused:{str(first_failure)[:40]}", "Redis refused %d entries: %s",
                             sum(failed.values()), first_failure)
        self._batches += 1
        self._entries += len(batch)
        self._max_seen = max(self._max_seen, len(batch))


def _count_by_kind(counter: Any, per_key: Counter[str]) -> None:
    by_kind: Counter[str] = Counter()
    for key, n in per_key.items():
        by_kind[stream_kind(key)] += n
    for kind, n in by_kind.items():
        counter.labels(kind).inc(n)
