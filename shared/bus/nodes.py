"""Where the bus's commands go: one small interface, one implementation per Redis topology.

The publisher (`shared.bus.publisher`) and the reader (`shared.bus.reader`)
hold the logic that does not depend on topology (batching, retries, ordering,
positions, decoding, dead letters); a node only writes batches of XADDs and
reads streams:

- `WireNode`: one Redis server through a connection held out of the client's
  pool, commands hand-packed (`wire.py`): XADD batches are written without
  waiting for the replies of the batches before (replies come back in order on
  that connection), and an XREAD names up to `shard_size` streams.
- `RedisPyNode`: any other single-server client, through redis-py's pipeline
  and `xread` (one batch in flight).
- `ClusterNodes`: a Redis Cluster. XADD batches go through redis-py's cluster
  pipeline (each master gets its share, all at once; a master that fails
  leaves connection errors as the results of its entries only). One XREAD may
  only name keys of one hash slot, so streams are grouped by slot and each
  master gets the XREADs of its slots hand-packed in one write on a connection
  held for it, without BLOCK (polling `cluster_poll_ms` apart up to the read's
  block time): blocking would need a connection per slot group. A slot that
  moved (MOVED/ASK) is read through redis-py, which follows the redirect; after
  a connection error the next round goes through redis-py too, which
  re-reads the layout.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from ..protocol import ENTRY_FIELD
from ..redis_conn import is_cluster, node_client
from .entries import redis_py_replies, stream_replies
from .wire import Wire, as_bytes, bulk, has_pool, pack_xadd

# One XADD: (key, encoded message, MAXLEN ~ bound, entry id or "*").
Xadd = tuple[str, bytes, int, str]
Replies = list[tuple[Any, list[Any]]]  # (key, entries) of XREAD replies


class BusNode(ABC):
    """The topology behind one publisher or one reader (each owns its node)."""

    max_in_flight: int = 1  # XADD batches the publisher may have unanswered at once

    # ------------------------------------------------------------ publishing
    @abstractmethod
    async def send(self, batch: list[Xadd]) -> asyncio.Future[list[Any]]:
        """Write a batch (raises a connection error if it could not be written). The future returned
        gets one result per entry in order (its id, or the error Redis answered for it), or fails
        with a connection error (then nothing of that batch is known). Called by one task at a time."""

    # ------------------------------------------------------------ reading
    def follow(self, key: str) -> None:  # noqa: B027  (optional: a node with per-key caches overrides it)
        """A stream the reader now follows (caches per key live here)."""

    def forget(self, key: str) -> None:  # noqa: B027  (optional, as follow)
        """A stream the reader no longer follows."""

    @abstractmethod
    async def read(self, keys: list[str], positions: Mapping[str, bytes | str], count: int, block_ms: int) -> Replies:
        """Entries after `positions` of `keys`, waiting up to `block_ms` while there are none."""

    # ------------------------------------------------------------ connections
    async def reset(self) -> None:  # noqa: B027  (optional: a node without held connections has nothing to do)
        """Abandon the connection(s) after an error: the next command takes a fresh one."""

    async def aclose(self) -> None:
        await self.reset()


def node_for(redis: aioredis.Redis, *, shard_size: int = 512, cluster_poll_ms: float = 5.0) -> BusNode:
    """The node for this client's topology (a fresh one: its held connection is its own)."""
    if is_cluster(redis):
        return ClusterNodes(redis, poll_ms=cluster_poll_ms)
    if has_pool(redis):
        return WireNode(redis, shard_size=shard_size)
    return RedisPyNode(redis, shard_size=shard_size)


def _pipeline(redis: Any, batch: list[Xadd]) -> asyncio.Future[list[Any]]:
    pipe = redis.pipeline(transaction=False)
    for key, data, maxlen, entry_id in batch:
        pipe.xadd(key, {ENTRY_FIELD: data}, id=entry_id, maxlen=maxlen, approximate=True)
    done: asyncio.Future[list[Any]] = asyncio.ensure_future(pipe.execute(raise_on_error=False))
    return done


def _shards(keys: list[str], size: int) -> list[list[str]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


class _PackedReads:
    """XREAD commands hand-packed from cached per-key bytes: the same keys repeat every round, and a
    stream's position changes only when it had entries."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._ids: dict[str, tuple[bytes | str, bytes]] = {}  # key -> (position, its packed form)

    def follow(self, key: str) -> None:
        self._keys[key] = bulk(key.encode())

    def forget(self, key: str) -> None:
        self._keys.pop(key, None)
        self._ids.pop(key, None)

    def live(self, keys: list[str], positions: Mapping[str, bytes | str]) -> list[str]:
        """The keys still followed: a session may close while a read awaits, between two packings."""
        return [k for k in keys if k in self._keys and k in positions]

    def _id(self, key: str, pos: bytes | str) -> bytes:
        cached = self._ids.get(key)
        if cached is None or cached[0] != pos:
            cached = self._ids[key] = (pos, bulk(as_bytes(pos)))
        return cached[1]

    def xread(self, keys: list[str], positions: Mapping[str, bytes | str], count: int, block_ms: int | None) -> bytes:
        head = [b"XREAD", b"COUNT", b"%d" % count]
        if block_ms is not None:
            head += [b"BLOCK", b"%d" % block_ms]
        head.append(b"STREAMS")
        packed = self._keys
        return b"*%d\r\n%b%b%b" % (
            len(head) + 2 * len(keys),
            b"".join(map(bulk, head)),
            b"".join([packed[k] for k in keys]),
            b"".join([self._id(k, positions[k]) for k in keys]),
        )


class WireNode(BusNode):
    max_in_flight = 16  # more than one lets a batch go out while Redis answers the last (ops/bench/bus_hop.py)

    def __init__(self, redis: aioredis.Redis, *, shard_size: int = 512) -> None:
        self._wire = Wire(redis)
        self._shard = max(1, shard_size)
        self._packed = _PackedReads()
        self._replies: asyncio.Queue[tuple[int, asyncio.Future[list[Any]]]] = asyncio.Queue()
        self._unanswered = 0  # batches written whose replies are not all read yet
        self._reader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ publishing
    async def send(self, batch: list[Xadd]) -> asyncio.Future[list[Any]]:
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        packed = b"".join([pack_xadd(k, n, i, d) for k, d, n, i in batch])
        epoch = self._wire.epoch
        # No health-check PING while replies are unread: redis-py would read one of them as its PONG.
        await self._wire.send(packed, check_health=self._unanswered == 0)
        if epoch != self._wire.epoch:  # dropped while writing: nothing of it is known
            raise ConnectionError("the connection was dropped while a batch was written")
        self._unanswered += 1
        self._replies.put_nowait((len(batch), fut))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_replies(), name="voxbus-bus-replies")
        return fut

    async def _read_replies(self) -> None:
        while True:
            n, fut = await self._replies.get()
            try:
                results = await self._wire.read(n)
            except BaseException as exc:
                self._fail_all(fut, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            self._unanswered -= 1
            if not fut.done():
                fut.set_result(results)

    def _fail_all(self, first: asyncio.Future[list[Any]], exc: BaseException) -> None:
        """A broken connection loses every batch written on it and not yet answered."""
        pending = [first]
        while not self._replies.empty():
            pending.append(self._replies.get_nowait()[1])
        self._unanswered = 0
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc if not isinstance(exc, asyncio.CancelledError) else ConnectionError("closed"))

    # ------------------------------------------------------------ reading
    def follow(self, key: str) -> None:
        self._packed.follow(key)

    def forget(self, key: str) -> None:
        self._packed.forget(key)

    async def read(self, keys: list[str], positions: Mapping[str, bytes | str], count: int, block_ms: int) -> Replies:
        if len(keys) <= self._shard:
            replies = await self._wire.call(self._packed.xread(keys, positions, count, block_ms))
        else:
            # Every shard without BLOCK in one write; only when all are empty, block over every stream,
            # so an idle shard never holds back entries another shard already has.
            shards = _shards(keys, self._shard)
            replies = await self._wire.call(b"".join(self._packed.xread(s, positions, count, None) for s in shards),
                                            len(shards))
            if not any(replies):
                keys = self._packed.live(keys, positions)
                if not keys:
                    return []
                replies = await self._wire.call(self._packed.xread(keys, positions, count, block_ms))
        return [pair for reply in replies for pair in stream_replies(reply)]

    # ------------------------------------------------------------ connections
    async def reset(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        while not self._replies.empty():
            _, fut = self._replies.get_nowait()
            if not fut.done():
                fut.set_exception(ConnectionError("connection dropped"))
        self._unanswered = 0
        await self._wire.drop()

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await self._wire.release()


class RedisPyNode(BusNode):
    """A single server through redis-py's generic pipeline and xread."""

    def __init__(self, redis: aioredis.Redis, *, shard_size: int = 512) -> None:
        self._redis = redis
        self._shard = max(1, shard_size)

    async def send(self, batch: list[Xadd]) -> asyncio.Future[list[Any]]:
        return _pipeline(self._redis, batch)

    async def read(self, keys: list[str], positions: Mapping[str, bytes | str], count: int, block_ms: int) -> Replies:
        replies = await asyncio.gather(*(
            self._redis.xread({k: positions[k] for k in shard}, count=count, block=block_ms)
            for shard in _shards(keys, self._shard)))
        return [pair for reply in replies for pair in redis_py_replies(reply)]


class ClusterNodes(BusNode):
    def __init__(self, redis: aioredis.Redis, *, poll_ms: float = 5.0) -> None:
        self._redis: Any = redis
        self._poll_s = max(0.0, poll_ms) / 1000
        self._by_slot: dict[int, dict[str, None]] = {}  # slot -> followed keys (ordered set)
        self._node_wires: dict[str, tuple[aioredis.Redis, Wire]] = {}  # node name -> its held connection
        self._via_redis_py = False  # the next round goes through redis-py (after an error)
        self._packed = _PackedReads()

    async def send(self, batch: list[Xadd]) -> asyncio.Future[list[Any]]:
        return _pipeline(self._redis, batch)  # redis-py's cluster pipeline sends each master its share

    def follow(self, key: str) -> None:
        self._packed.follow(key)
        self._by_slot.setdefault(key_slot(key.encode()), {})[key] = None

    def forget(self, key: str) -> None:
        self._packed.forget(key)
        slot = key_slot(key.encode())
        group = self._by_slot.get(slot, {})
        group.pop(key, None)
        if not group:
            self._by_slot.pop(slot, None)

    async def read(self, keys: list[str], positions: Mapping[str, bytes | str], count: int, block_ms: int) -> Replies:
        """Poll every slot group (one XREAD each, no BLOCK) until something arrives or `block_ms` ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            groups = [list(g) for g in self._by_slot.values()]
            replies = await self._poll(groups, positions, count)
            if replies or not groups:
                return replies
            left = deadline - loop.time()
            if left <= 0:
                return []
            await asyncio.sleep(min(self._poll_s, left))

    async def _poll(self, groups: list[list[str]], positions: Mapping[str, bytes | str], count: int) -> Replies:
        """One XREAD per slot group, every master at once; the entries of those that answered."""
        if self._via_redis_py:
            replies = await self._via_redis(groups, positions, count)
            self._via_redis_py = False
            return replies
        plan: dict[str, tuple[Any, list[list[str]]]] = {}
        try:
            await self._redis.initialize()  # the slot map: read once, and again after redis-py dropped it
            for keys in filter(None, (self._packed.live(g, positions) for g in groups)):
                node = self._redis.get_node_from_key(keys[0])
                plan.setdefault(node.name, (node, []))[1].append(keys)
        except Exception:
            self._via_redis_py = True
            raise
        # Packed now: a stream removed while the writes are scheduled must not break them.
        packed = [b"".join([self._packed.xread(keys, positions, count, None) for keys in node_groups])
                  for _, node_groups in plan.values()]
        results = await asyncio.gather(
            *(self._node_call(node, data, len(node_groups)) for (node, node_groups), data in zip(plan.values(), packed)),
            return_exceptions=True,
        )
        out: Replies = []
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
                    out += stream_replies(reply)
        if failure is not None:
            # The answered groups are dropped too: their positions did not move, so the next round
            # reads them again, through redis-py, which re-reads the layout.
            self._via_redis_py = True
            raise failure
        if moved:
            out += await self._via_redis(moved, positions, count)
        return out

    async def _node_call(self, node: Any, packed: bytes, replies: int) -> list[Any]:
        entry = self._node_wires.get(node.name)
        if entry is None:
            # A client of its own per node: the cluster client drops every node connection when it
            # re-reads the layout; and no retries: the reader backs off instead.
            client = node_client(node, retry=Retry(NoBackoff(), 0))
            entry = self._node_wires[node.name] = (client, Wire(client))
        try:
            return await entry[1].call(packed, replies)
        except BaseException:
            await self._drop_node(node.name)
            raise

    async def _via_redis(self, groups: list[list[str]], positions: Mapping[str, bytes | str], count: int) -> Replies:
        pipe = self._redis.pipeline(transaction=False)
        for keys in groups:
            keys = [k for k in keys if k in positions]
            if keys:
                # The node is named: left to redis-py, routing an XREAD (a command with "movable keys")
                # costs a COMMAND GETKEYS round trip per XREAD.
                pipe.execute_command("XREAD", "COUNT", count, "STREAMS", *keys, *[positions[k] for k in keys],
                                     target_nodes=self._redis.get_node_from_key(keys[0]))
        replies = await pipe.execute()
        return [pair for reply in replies for pair in redis_py_replies(reply)]

    async def _drop_node(self, name: str) -> None:
        entry = self._node_wires.pop(name, None)
        if entry is not None:
            client, wire = entry
            await wire.drop()
            await client.aclose()

    async def reset(self) -> None:
        for name in list(self._node_wires):
            await self._drop_node(name)

    async def aclose(self) -> None:
        await self.reset()
