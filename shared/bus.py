"""The bus client: batched stream publishing and multiplexed stream reading.

`BatchPublisher` coalesces every XADD issued within one event-loop tick (across
all sessions) into one pipelined write, without waiting for the replies of the
batches before it. `StreamMux` reads any number of streams with one XREAD per
round, so a bridge holding hundreds of sessions needs one reader task, not one
per session. Both survive Redis restarts with back-off instead of crashing.

Both hot paths hold one connection of the client's pool for themselves and
write hand-packed RESP commands on it (`Wire`): per frame, redis-py's generic
pipeline costs more than the Redis work (pool checkout, Python packing, a timer
per reply, response callbacks). On a Redis Cluster (a client without a
connection pool) the publisher takes redis-py's generic path, whose cluster
pipelines split each batch per node; the reader groups its streams by hash
slot, because one XREAD may only name keys of one slot, and holds one
connection per master for its hand-packed reads (see `StreamMux`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError

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
from .logs import RateLimitedLog
from .redis_conn import TRANSIENT_ERRORS, Backoff, is_cluster, node_client
from .tasks import finish_task
from .wire import Wire, as_bytes, bulk, has_pool, pack_xadd

log = logging.getLogger("voxbus.bus")
_limited = RateLimitedLog(log)

DUPLICATE_ID_ERROR = "equal or smaller than the target stream top item"


def stream_kind(key: str) -> str:
    return key.rsplit(":", 1)[-1]


def session_of(key: str) -> str | None:
    """The session id inside a per-session key's hash tag, or None."""
    start, end = key.find("{"), key.find("}")
    return key[start + 1 : end] if 0 <= start < end else None


# --------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------

_Pending = tuple[str, bytes, int, str, "asyncio.Future[bytes | None]"]

# Batches written whose replies are not read yet. More than one lets a frame go out
# while Redis still answers the previous batch (1000 sessions: p99 ~20 ms instead
# of ~70-140 ms with one, ops/bench/bus_hop.py); the cap bounds what a dead
# connection can have swallowed before the reader notices.
MAX_IN_FLIGHT = 16


class BatchPublisher:
    """Pipelines XADDs: everything published in the same tick goes in one round trip.

    Batches are written as soon as they form, without waiting for the replies
    of earlier ones (at most MAX_IN_FLIGHT outstanding); a reader task matches
    replies to batches in order. A connection error sends every unanswered
    batch again after back-off, so nothing is lost; a retried batch may land
    twice, which consumers absorb because every output carries (turn, seq).
    """

    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 4096, max_buffer: int = 200_000) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._max_buffer = max_buffer
        # Unsettled entries, oldest first; the first `_sent` of them are on the wire,
        # in batches of the sizes in `_in_flight`.
        self._buf: list[_Pending] = []
        self._sent = 0
        self._in_flight: deque[int] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._replies_due = asyncio.Event()
        self._slot = asyncio.Event()
        self._slot.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._wire = Wire(redis) if has_pool(redis) else None
        self._backoff = Backoff()
        self._batches = self._entries = self._max_seen = 0

    def publish_nowait(
        self, key: str, msg: Message, maxlen: int | None = None, entry_id: str = "*"
    ) -> asyncio.Future[bytes | None]:
        """Queue one XADD; the future resolves to the entry id once Redis has it, or to
        None when an explicit `entry_id` was already taken (a duplicate, dropped)."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run(), name="voxbus-publisher")
        fut: asyncio.Future[bytes | None] = loop.create_future()
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
        pending = [item[-1] for item in self._buf]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        self._closed = True
        if self._task:
            await finish_task(self._task, grace_s=0)
        if self._wire is not None:
            await self._wire.release()

    def stats(self) -> dict[str, float]:
        """Batches answered, entries in them, the largest batch and the mean."""
        mean = self._entries / self._batches if self._batches else 0.0
        return {"batches": self._batches, "entries": self._entries, "max_batch": self._max_seen, "mean_batch": round(mean, 2)}

    async def _run(self) -> None:
        if self._wire is None:
            await self._run_generic()
            return
        reader = asyncio.get_running_loop().create_task(self._read_replies(self._wire), name="voxbus-publisher-replies")
        try:
            await self._write_batches(self._wire)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _write_batches(self, wire: Wire) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._sent < len(self._buf):
                if len(self._in_flight) >= MAX_IN_FLIGHT:
                    self._slot.clear()
                    await self._slot.wait()
                    continue
                start = self._sent
                batch = self._buf[start : start + self._max_batch]
                epoch = wire.epoch
                try:
                    packed = b"".join([pack_xadd(k, n, i, d) for k, d, n, i, _ in batch])
                    await wire.send(packed, check_health=not self._in_flight)
                except TRANSIENT_ERRORS as exc:
                    await self._resend_all(wire, epoch, exc)
                    continue
                except Exception as exc:  # not retryable: fail this batch's callers, keep serving
                    if epoch != wire.epoch:
                        continue
                    log.exception("publish of %d entries failed", len(batch))
                    del self._buf[start : start + len(batch)]
                    self._requeue()
                    await wire.drop()  # part of the batch may be on it
                    self._settle(batch, [exc] * len(batch))
                    continue
                if epoch != wire.epoch:
                    continue  # the connection was dropped while this was written: requeued already
                self._sent += len(batch)
                self._in_flight.append(len(batch))
                self._replies_due.set()

    async def _read_replies(self, wire: Wire) -> None:
        while True:
            if not self._in_flight:
                self._replies_due.clear()
                await self._replies_due.wait()
                continue
            n, epoch = self._in_flight[0], wire.epoch
            broken = False
            try:
                results = await wire.read(n)
            except TRANSIENT_ERRORS as exc:
                await self._resend_all(wire, epoch, exc)
                continue
            except Exception as exc:  # a reply we cannot parse: fail that batch, resend the rest
                if epoch != wire.epoch:
                    continue
                log.exception("reading the replies of %d entries failed", n)
                results, broken = [exc] * n, True
            if epoch != wire.epoch:
                continue  # answered on a connection dropped meanwhile: the batch was requeued
            self._in_flight.popleft()
            batch = self._buf[:n]
            del self._buf[:n]
            self._sent -= n
            self._slot.set()
            if broken:
                self._requeue()
                await wire.drop()
            else:
                self._backoff.reset()
            self._settle(batch, results)

    async def _resend_all(self, wire: Wire, epoch: int, exc: BaseException) -> None:
        """After a connection error every unanswered batch goes again: handled once, by
        whichever task saw the error first; the other finds its epoch outdated."""
        if epoch != wire.epoch:
            return
        metrics.BUS_RECONNECTS.labels("publisher").inc()
        _limited.warning("publish-retry", "publish of %d entries failed (%s); retrying", len(self._buf), exc)
        self._requeue()
        await wire.drop()
        await self._backoff.sleep()

    def _requeue(self) -> None:
        self._sent = 0
        self._in_flight.clear()
        self._slot.set()
        self._wake.set()

    async def _run_generic(self) -> None:
        """One pipelined batch at a time through redis-py (clients without a connection pool).

        A Redis Cluster pipeline sends each node its share of the batch, all nodes
        at once. A node that fails mid-batch leaves connection errors as the
        results of its entries while the other nodes' entries landed: only the
        failed entries stay queued, and go again (in their order) after back-off.
        """
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
                    await self._backoff.sleep()
                    continue
                except Exception as exc:  # not retryable: fail this batch's callers, keep serving
                    log.exception("publish of %d entries failed", len(batch))
                    results = [exc] * len(batch)
                del self._buf[: len(batch)]
                retry = [item for item, res in zip(batch, results) if isinstance(res, TRANSIENT_ERRORS)]
                if retry:
                    done = [(item, res) for item, res in zip(batch, results) if not isinstance(res, TRANSIENT_ERRORS)]
                    self._buf[:0] = retry
                    if done:
                        self._settle([item for item, _ in done], [res for _, res in done])
                    metrics.BUS_RECONNECTS.labels("publisher").inc()
                    log.warning("publish of %d of %d entries failed (%s); retrying", len(retry), len(batch),
                                next(r for r in results if isinstance(r, TRANSIENT_ERRORS)))
                    await self._backoff.sleep()
                    continue
                self._backoff.reset()
                self._settle(batch, results)

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


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Received:
    key: str
    entry_id: bytes
    msg: AnyMessage


async def dead_letter(redis: aioredis.Redis, dlq: str, letter: DeadLetter, kind: str) -> None:
    """Append a rejected entry to a dead-letter stream (bounded) and count it."""
    await redis.xadd(dlq, {ENTRY_FIELD: encode(letter)}, maxlen=maxlen_for(dlq), approximate=True)
    metrics.BUS_DEAD_LETTERED.labels(kind).inc()


_REJECT_LABELS: tuple[tuple[str, str], ...] = (
    ("exceeds", "oversized"),
    ("exactly the field", "wrong fields"),
    ("unknown session", "unknown session"),
    ("invalid session id", "invalid session"),
    ("names session", "wrong session"),
    ("at `$.type`", "unknown type"),
    ("unexpected message", "wrong type"),
    ("does not belong", "wrong type"),
    ("is not a job", "wrong type"),
    (" pool", "wrong type"),  # "LlmJob in a AsrJob pool"
    ("messagepack", "undecodable"),
    ("truncated", "undecodable"),
    ("expected bytes", "undecodable"),
)


def reject_label(reason: str) -> str:
    """A bounded `reason` label for voxbus_bus_rejected_total."""
    text = reason.lower()
    for needle, label in _REJECT_LABELS:
        if needle.lower() in text:
            return label
    return "invalid"


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


def _field_map(fields: Any) -> dict[bytes, bytes]:
    """An entry's flat [field, value, ...] reply as a dict (a dict reply passes through)."""
    if isinstance(fields, dict):
        return fields
    if not fields:
        return {}
    if len(fields) == 2:
        return {fields[0]: fields[1]}
    return dict(zip(fields[::2], fields[1::2]))


def _stream_replies(reply: Any) -> list[tuple[Any, list[Any]]]:
    """(key, entries) pairs of an XREAD reply, RESP3 map or RESP2 array alike."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(item[0], item[1]) for item in reply]


class StreamMux:
    """Reads many streams through one XREAD call per round.

    Streams can be added and removed at any time; a stream added while a read
    is blocked is picked up when that read returns (at most `block_ms` later),
    and nothing is missed because positions are tracked per stream. Entries
    that do not decode or do not belong to their stream go to `Keys.DLQ`.

    With more than `shard_size` streams a round sends one XREAD per shard in a
    single pipelined write without blocking; only when all of them come back
    empty does it block, in one XREAD over every stream, so an idle shard never
    holds back entries another shard already has.

    On a Redis Cluster one XREAD may only name keys of one hash slot: streams
    are grouped by slot (a session's streams share one, so each session is one
    XREAD), and a round polls every group without BLOCK: each master gets the
    XREADs of its slots hand-packed in one write on a connection held for it,
    all masters at once. When nothing arrived the round sleeps
    `cluster_poll_ms` and polls again, up to `block_ms`. Blocking instead would
    need one blocked connection per slot group (a thousand sessions, a
    thousand connections, each round waiting on the slowest). The price of
    polling: up to `cluster_poll_ms` of added latency for the first entry
    after a quiet spell, and while quiet about 1000 / cluster_poll_ms XREADs
    per second per session (a few microseconds each, in Redis and here).
    A slot that moved (MOVED/ASK) is read through redis-py, which follows the
    redirect and updates the client's slot map; after a connection error the
    next round goes through redis-py too, which re-reads the cluster layout.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        block_ms: int = 50,
        count: int = 256,
        shard_size: int = 512,
        cluster_poll_ms: float = 5.0,
    ) -> None:
        self._redis = redis
        self._block_ms = block_ms
        self._count = count
        self._shard = max(1, shard_size)
        self._cluster = is_cluster(redis)
        self._poll_s = max(0.0, cluster_poll_ms) / 1000
        self._by_slot: dict[int, dict[str, None]] = {}  # cluster: slot -> followed keys (ordered set)
        self._node_wires: dict[str, tuple[aioredis.Redis, Wire]] = {}  # cluster: node name -> its held connection
        self._via_redis_py = False  # cluster: the next round goes through redis-py (after an error)
        self._pos: dict[str, bytes | str] = {}
        self._packed_keys: dict[str, bytes] = {}
        self._packed_ids: dict[str, bytes] = {}
        self._names: dict[bytes, str] = {}
        self._backoff = Backoff()
        self._wire = Wire(redis) if has_pool(redis) else None
        self._reading = asyncio.Lock()  # one round at a time on the held connection

    def __contains__(self, key: str) -> bool:
        return key in self._pos

    def __len__(self) -> int:
        return len(self._pos)

    async def add(self, key: str, last_id: str = "$") -> None:
        """Follow `key` from after `last_id` ("$" = only entries added from now on)."""
        if last_id == "$":
            newest = await self._redis.xrevrange(key, count=1)
            last_id = newest[0][0] if newest else "0-0"
        raw = key.encode()
        self._names[raw] = key
        self._packed_keys[key] = bulk(raw)
        self._set_pos(key, last_id)
        if self._cluster:
            self._by_slot.setdefault(key_slot(raw), {})[key] = None

    def remove(self, key: str) -> None:
        if self._pos.pop(key, None) is not None and self._cluster:
            slot = key_slot(key.encode())
            group = self._by_slot.get(slot, {})
            group.pop(key, None)
            if not group:
                self._by_slot.pop(slot, None)
        self._packed_keys.pop(key, None)
        self._packed_ids.pop(key, None)
        self._names.pop(key.encode(), None)

    async def aclose(self) -> None:
        """Give the held connection back to the client's pool (optional: `redis.aclose()` closes it too).

        On a cluster this closes the connections held for each node (not optional there).
        """
        if self._wire is not None:
            await self._wire.release()
        for name in list(self._node_wires):
            await self._drop_node(name)

    def _set_pos(self, key: str, entry_id: bytes | str) -> None:
        self._pos[key] = entry_id
        self._packed_ids[key] = bulk(as_bytes(entry_id))

    async def read(self) -> list[Received]:
        """One round: entries from all followed streams (blocks up to block_ms if none)."""
        if not self._pos:
            await asyncio.sleep(self._block_ms / 1000)
            return []
        try:
            async with self._reading:
                replies = await self._fetch()
        except TRANSIENT_ERRORS as exc:
            metrics.BUS_RECONNECTS.labels("reader").inc()
            _limited.warning("read", "stream read failed (%s); retrying", exc)
            await self._backoff.sleep()
            return []
        self._backoff.reset()
        out: list[Received] = []
        rejected: list[tuple[str, bytes, dict[bytes, bytes], str]] = []
        for reply in replies:
            for raw_key, entries in _stream_replies(reply):
                self._take(raw_key, entries, out, rejected)
        for rejection in rejected:
            await self._reject(*rejection)
        return out

    def _take(self, raw_key: bytes | str, entries: list[Any], out: list[Received], rejected: list[Any]) -> None:
        """Decode one stream's entries into `out` (bad ones into `rejected`) and move its position."""
        key = self._names.get(raw_key) if isinstance(raw_key, bytes) else raw_key
        if key is None or key not in self._pos or not entries:
            return
        self._set_pos(key, entries[-1][0])
        for entry_id, raw_fields in entries:
            fields = _field_map(raw_fields)
            try:
                out.append(Received(key, entry_id, check_entry(key, fields)))
            except ProtocolError as exc:
                rejected.append((key, entry_id, fields, str(exc)))

    async def _fetch(self) -> list[Any]:
        if self._cluster:
            return await self._fetch_cluster()
        if self._wire is None:
            return await self._fetch_generic()
        if len(self._pos) <= self._shard:
            return await self._wire.call(self._pack_xread(list(self._pos), self._block_ms))
        keys = list(self._pos)
        shards = [keys[i : i + self._shard] for i in range(0, len(keys), self._shard)]
        replies = await self._wire.call(b"".join(self._pack_xread(s, None) for s in shards), len(shards))
        if any(replies):
            return replies
        # list(self._pos) again: a stream removed while we awaited must not be named
        return await self._wire.call(self._pack_xread(list(self._pos), self._block_ms))

    def _pack_xread(self, keys: list[str], block_ms: int | None) -> bytes:
        head = [b"XREAD", b"COUNT", b"%d" % self._count]
        if block_ms is not None:
            head += [b"BLOCK", b"%d" % block_ms]
        head.append(b"STREAMS")
        n_args = len(head) + 2 * len(keys)
        pk, pi = self._packed_keys, self._packed_ids
        return b"*%d\r\n%b%b%b" % (
            n_args,
            b"".join(map(bulk, head)),
            b"".join([pk[k] for k in keys]),
            b"".join([pi[k] for k in keys]),
        )

    async def _fetch_generic(self) -> list[Any]:
        keys = list(self._pos)
        shards = [keys[i : i + self._shard] for i in range(0, len(keys), self._shard)]
        replies = await asyncio.gather(*(self._xread(s) for s in shards))
        # redis-py's RESP3 callback nests each stream's entries one level deeper
        return [[(k, v[0]) for k, v in r.items()] if isinstance(r, dict) else r for r in replies]

    async def _xread(self, keys: list[str]):
        streams = {k: self._pos[k] for k in keys if k in self._pos}  # some may have been removed meanwhile
        if not streams:
            return []
        return await self._redis.xread(streams, count=self._count, block=self._block_ms)

    async def _fetch_cluster(self) -> list[Any]:
        """Poll every slot group (one XREAD each, no BLOCK) until something arrives or `block_ms` ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._block_ms / 1000
        while True:
            replies = await self._poll_slots()
            if any(replies):
                return replies
            left = deadline - loop.time()
            if left <= 0 or not self._by_slot:
                return []
            await asyncio.sleep(min(self._poll_s, left))

    async def _poll_slots(self) -> list[Any]:
        """One XREAD per slot group, every master at once; the replies of those that answered."""
        groups = [list(group) for group in self._by_slot.values()]
        if self._via_redis_py:
            replies = await self._poll_via_redis_py(groups)
            self._via_redis_py = False
            return replies
        redis: Any = self._redis
        plan: dict[str, tuple[Any, list[list[str]]]] = {}
        try:
            await redis.initialize()  # the slot map: read once, and again after redis-py dropped it
            for keys in groups:
                node = redis.get_node_from_key(keys[0])
                plan.setdefault(node.name, (node, []))[1].append(keys)
        except Exception:
            self._via_redis_py = True
            raise
        # Packed now: a stream removed while the writes are scheduled must not break them.
        packed = [b"".join([self._pack_xread(keys, None) for keys in node_groups]) for _, node_groups in plan.values()]
        results = await asyncio.gather(
            *(self._node_call(node, data, len(node_groups)) for (node, node_groups), data in zip(plan.values(), packed)),
            return_exceptions=True,
        )
        replies: list[Any] = []
        moved: list[list[str]] = []
        failure: BaseException | None = None
        for (_, node_groups), result in zip(plan.values(), results):
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            for keys, reply in zip(node_groups, result):
                if isinstance(reply, (AskError, TryAgainError, ClusterDownError)):  # AskError: MOVED too
                    moved.append(keys)
                elif isinstance(reply, Exception):
                    failure = failure or reply
                else:
                    replies.append(reply)
        if failure is not None:
            # The answered groups are dropped too: their positions did not move, so the
            # next round reads them again, through redis-py, which re-reads the layout.
            self._via_redis_py = True
            raise failure
        if moved:
            replies += await self._poll_via_redis_py(moved)
        return replies

    async def _node_call(self, node: Any, packed: bytes, replies: int) -> list[Any]:
        entry = self._node_wires.get(node.name)
        if entry is None:
            # A client of its own per node: the cluster client drops every node connection
            # when it re-reads the layout, and no retries: read() backs off instead.
            client = node_client(node, retry=Retry(NoBackoff(), 0))
            entry = self._node_wires[node.name] = (client, Wire(client))
        try:
            return await entry[1].call(packed, replies)
        except BaseException:
            await self._drop_node(node.name)
            raise

    async def _drop_node(self, name: str) -> None:
        entry = self._node_wires.pop(name, None)
        if entry is not None:
            client, wire = entry
            await wire.drop()
            await client.aclose()

    async def _poll_via_redis_py(self, groups: list[list[str]]) -> list[Any]:
        redis: Any = self._redis
        pipe = redis.pipeline(transaction=False)
        count, pos = self._count, self._pos
        for keys in groups:
            keys = [k for k in keys if k in pos]
            if keys:
                # The node is named here: left to redis-py, routing an XREAD (a command with
                # "movable keys") costs a COMMAND GETKEYS round trip per XREAD.
                pipe.execute_command(
                    "XREAD", "COUNT", count, "STREAMS", *keys, *[pos[k] for k in keys],
                    target_nodes=redis.get_node_from_key(keys[0]),
                )
        replies = await pipe.execute()
        # redis-py's RESP3 callback nests each stream's entries one level deeper
        return [[(k, v[0]) for k, v in r.items()] if isinstance(r, dict) else r for r in replies]

    async def _reject(self, key: str, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:

        kind = stream_kind(key)
        metrics.BUS_REJECTED.labels(kind, reject_label(reason)).inc()
        payload = fields.get(ENTRY_FIELD) or b"".join(k + b"=" + v for k, v in fields.items())
        letter = DeadLetter(
            source=key, entry_id=as_bytes(entry_id).decode(), reason=reason, payload=payload[:MAX_ENTRY_BYTES]
        )
        try:
            await dead_letter(self._redis, Keys.DLQ, letter, kind)
        except (ResponseError, *TRANSIENT_ERRORS) as exc:  # the rejection is still counted
            log.warning("could not dead-letter entry %s of %s: %s", entry_id, key, exc)

    async def __aiter__(self):
        while True:
            for item in await self.read():
                yield item
