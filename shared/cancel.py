"""Barge-in cancellation over Redis pub/sub.

The bridge publishes a `Cancel` on the session's channel and records the
cancelled turn in a key (so jobs still queued are skipped when claimed, and a
worker that was reconnecting when the message flew by still learns of it).

A worker process holds one pub/sub connection, pattern-subscribed to every
session's cancel channel from start-up, so there is no window in which a job
runs without being cancellable. Each running job holds a `CancelWatch`; the
hub sets it when a cancel for its session and turn arrives. Engines check
`watch.cancelled` between decode steps: a plain attribute read.

On a Redis Cluster, classic PUBLISH is broadcast over the cluster bus to every
node, so one pattern subscription on any one node hears the cancels of every
session, whichever master holds its keys. The hub subscribes through a plain
connection of its own to one node (picked at random, so the processes spread
over the nodes) and moves to the next node as soon as that connection fails;
the resync after every reconnect reads back (one MGET per slot) what was
cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import metrics
from .bus.entries import count_rejected
from .logs import RateLimitedLog
from .protocol import Cancel, Keys, ProtocolError, RejectReason, decode_as, encode
from .redis_conn import TRANSIENT_ERRORS, Backoff, is_cluster, mget, node_client
from .tasks import finish_task

log = logging.getLogger("voxbus.cancel")
_limited = RateLimitedLog(log)

CANCELLED_TTL_S = 24 * 3600


async def publish_cancel(redis: aioredis.Redis, cancel: Cancel) -> int:
    """Record and broadcast a cancel; returns how many subscribers got it."""
    # GREATEST semantics without a script: turns only grow, and the bridge is the only writer.
    # The key is set before the message flies, so a job starting in between sees it.
    if is_cluster(redis):
        # redis-py refuses PUBLISH in a cluster pipeline, and two connections would not keep
        # the order: one round trip more. The count is that of the node that got the PUBLISH.
        await redis.set(Keys.cancelled_turn(cancel.session), cancel.turn, ex=CANCELLED_TTL_S)
        return await redis.publish(Keys.cancel_channel(cancel.session), encode(cancel))
    # One round trip.
    pipe = redis.pipeline(transaction=False)
    pipe.set(Keys.cancelled_turn(cancel.session), cancel.turn, ex=CANCELLED_TTL_S)
    pipe.publish(Keys.cancel_channel(cancel.session), encode(cancel))
    return int((await pipe.execute())[1])


async def cancelled_turn(redis: aioredis.Redis, session: str) -> int:
    value = await redis.get(Keys.cancelled_turn(session))
    return int(value) if value is not None else -1


class CancelWatch:
    """Set when the session's `turn` (or a later one) is cancelled."""

    __slots__ = ("session", "turn", "event", "reason", "cancel_ts")

    def __init__(self, session: str, turn: int) -> None:
        self.session, self.turn = session, turn
        self.event = asyncio.Event()
        self.reason = ""
        self.cancel_ts = 0.0  # when the bridge published the cancel (wall clock)

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def fire(self, reason: str, ts: float = 0.0) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.cancel_ts = ts
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


class CancelHub:
    """One pub/sub connection per process, dispatching cancels to local watches."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._watches: dict[str, set[CancelWatch]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._turn = random.randrange(1 << 16)  # which cluster node to subscribe through next
        self.node: str | None = None  # cluster: "host:port" of the node the subscription is on

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="voxbus-cancel-hub")
        await self._ready.wait()

    async def aclose(self) -> None:
        if self._task:
            await finish_task(self._task, grace_s=0)
            self._task = None

    async def watch(self, session: str, turn: int) -> CancelWatch:
        """A watch for (session, turn), already set if that turn was cancelled before."""
        w = CancelWatch(session, turn)
        self._watches[session].add(w)
        if await cancelled_turn(self._redis, session) >= turn:
            w.fire("cancelled before start")
        return w

    def unwatch(self, w: CancelWatch) -> None:
        ws = self._watches.get(w.session)
        if ws is not None:
            ws.discard(w)
            if not ws:
                del self._watches[w.session]

    def _dispatch(self, cancel: Cancel) -> None:
        for w in list(self._watches.get(cancel.session, ())):
            if w.turn <= cancel.turn:
                w.fire(cancel.reason, cancel.ts)

    async def _resync(self) -> None:
        """After a reconnect: fire watches whose turn was cancelled while we were away."""
        sessions = list(self._watches)
        if not sessions:
            return
        values = await mget(self._redis, [Keys.cancelled_turn(s) for s in sessions])
        for sid, value in zip(sessions, values):
            if value is not None:
                self._dispatch(Cancel(session=sid, turn=int(value), reason="cancelled during reconnect"))

    async def _on_reconnect(self, _connection: object) -> None:
        """Called by redis-py once the pub/sub connection is back (after re-subscribing)."""
        metrics.BUS_RECONNECTS.labels("cancel").inc()
        try:
            await self._resync()
        except Exception as exc:  # raising here would fail redis-py's reconnect itself
            log.warning("cancel resync after reconnect failed: %s", exc)

    async def _run(self) -> None:
        backoff = Backoff()
        first = True
        subscribed_at: float | None = None
        while True:
            pubsub: Any = None
            own_client: aioredis.Redis | None = None
            try:
                pubsub, own_client = await self._pubsub()
                await pubsub.psubscribe(Keys.CANCEL_PATTERN)
                # redis-py reconnects (and re-subscribes) a broken pub/sub connection by itself
                # inside get_message(), so this loop may never see the error: resync from there too.
                if pubsub.connection is not None:
                    pubsub.connection.register_connect_callback(self._on_reconnect)
                if not first:
                    await self._resync()
                first = False
                self._ready.set()
                subscribed_at = asyncio.get_running_loop().time()
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is None or msg.get("type") != "pmessage":
                        continue
                    try:
                        cancel = decode_as(msg["data"], Cancel)
                    except ProtocolError as exc:
                        count_rejected("cancel", exc.reason)
                        log.warning("ignored malformed cancel on %r: %s", msg.get("channel"), exc)
                        continue
                    channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                    if channel != Keys.cancel_channel(cancel.session):
                        count_rejected("cancel", RejectReason.WRONG_CHANNEL)
                        continue  # a cancel naming session A sent on B's channel affects nobody
                    metrics.CANCELS_RECEIVED.inc()
                    self._dispatch(cancel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever Redis did, the process must keep hearing cancels
                if subscribed_at is not None and asyncio.get_running_loop().time() - subscribed_at > 10.0:
                    backoff.reset()  # it had worked for a while: this is a new outage, start over quickly
                subscribed_at = None
                metrics.BUS_RECONNECTS.labels("cancel").inc()
                _limited.warning(f"sub:{type(exc).__name__}", "cancel subscription lost (%s: %s); reconnecting",
                                 type(exc).__name__, exc)
                await backoff.sleep()
            finally:
                if pubsub is not None:
                    if pubsub.connection is not None:
                        pubsub.connection.deregister_connect_callback(self._on_reconnect)
                    try:
                        await pubsub.aclose()
                    except Exception:  # the connection is already broken; nothing to release
                        pass
                if own_client is not None:
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        await own_client.aclose()

    async def _pubsub(self) -> tuple[Any, aioredis.Redis | None]:
        """A pub/sub object, and on a cluster the client of the node it is bound to.

        On a cluster: the next node in turn (every node hears every PUBLISH),
        through a client without retries, so that a failing node sends this
        loop to the next one at once instead of after the client's back-off.
        """
        if not is_cluster(self._redis):
            return self._redis.pubsub(ignore_subscribe_messages=True), None
        redis: Any = self._redis
        await redis.initialize()  # no-op while the layout is known
        nodes = sorted(redis.get_nodes(), key=lambda n: n.name)
        if not nodes:
            raise ConnectionError("the Redis Cluster lists no nodes")
        node = nodes[self._turn % len(nodes)]
        self._turn += 1
        self.node = node.name
        client = node_client(node, retry=Retry(NoBackoff(), 0))
        return client.pubsub(ignore_subscribe_messages=True), client
