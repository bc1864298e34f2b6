"""Barge-in cancellation (shared/cancel.py) over real Redis pub/sub.

A cancel reaches only its own session's watches, only for its turn and older,
never through another session's channel; a watch made after its turn was
cancelled starts cancelled; a cancel sent while the hub's subscription was
broken still reaches the running job once the hub is back.

Pub/sub messages on one connection arrive in order, so "X did not fire" is
checked after a later sentinel cancel has been seen: by then X was dispatched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from shared.admin.embedded_redis import EmbeddedRedis
from shared.cancel import CANCELLED_TTL_S, CancelHub, CancelWatch, cancelled_turn, publish_cancel
from shared.protocol import Cancel, Interrupt, Keys, encode
from shared.redis_conn import connect


@pytest_asyncio.fixture
async def hub(redis: aioredis.Redis) -> AsyncIterator[CancelHub]:
    h = CancelHub(redis)
    await asyncio.wait_for(h.start(), 10)
    try:
        yield h
    finally:
        await h.aclose()


async def fired(w: CancelWatch, timeout: float = 5.0) -> bool:
    try:
        await asyncio.wait_for(w.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def sentinel(hub: CancelHub, redis: aioredis.Redis, sid: str) -> None:
    """Publish a cancel for a throwaway session and wait until the hub has dispatched it."""
    w = await hub.watch(sid, 0)
    await publish_cancel(redis, Cancel(session=sid, turn=0))
    assert await fired(w), "the hub stopped dispatching cancels"
    hub.unwatch(w)


async def test_cancel_for_one_session_never_reaches_another(hub: CancelHub, redis: aioredis.Redis, uid: str) -> None:
    a, b = f"a-{uid}", f"b-{uid}"
    wa, wb = await hub.watch(a, 1), await hub.watch(b, 1)
    receivers = await publish_cancel(redis, Cancel(session=a, turn=1, reason="caller spoke"))
    assert receivers >= 1
    assert await fired(wa)
    assert wa.reason == "caller spoke"
    await sentinel(hub, redis, f"s-{uid}")
    assert not wb.cancelled
    assert await cancelled_turn(redis, b) == -1


async def test_cancel_naming_a_on_bs_channel_affects_nobody(
    embedded_redis: EmbeddedRedis, uid: str, counter: Callable[..., float]
) -> None:
    # A private server: the metric below must count this test's message only.
    redis = connect(embedded_redis.url)
    hub = CancelHub(redis)
    try:
        await asyncio.wait_for(hub.start(), 10)
        a, b = f"a-{uid}", f"b-{uid}"
        wa, wb = await hub.watch(a, 1), await hub.watch(b, 1)
        wrong_before = counter("voxbus_bus_rejected_total", kind="cancel", reason="wrong channel")
        assert await redis.publish(Keys.cancel_channel(b), encode(Cancel(session=a, turn=1))) == 1
        await sentinel(hub, redis, f"s-{uid}")
        assert not wa.cancelled and not wb.cancelled
        assert counter("voxbus_bus_rejected_total", kind="cancel", reason="wrong channel") - wrong_before == 1
    finally:
        await hub.aclose()
        await redis.aclose()


async def test_cancel_fires_watches_of_its_turn_and_older_only(hub: CancelHub, redis: aioredis.Redis, uid: str) -> None:
    sid = f"t-{uid}"
    watches = {turn: await hub.watch(sid, turn) for turn in range(1, 6)}
    await publish_cancel(redis, Cancel(session=sid, turn=3))
    assert await fired(watches[3])
    await sentinel(hub, redis, f"s-{uid}")
    assert {t for t, w in watches.items() if w.cancelled} == {1, 2, 3}
    assert all(watches[t].reason == "barge-in" for t in (1, 2, 3))


async def test_watch_created_after_its_turn_was_cancelled_starts_cancelled(
    hub: CancelHub, redis: aioredis.Redis, uid: str
) -> None:
    a, b = f"a-{uid}", f"b-{uid}"
    await publish_cancel(redis, Cancel(session=a, turn=4))
    assert await cancelled_turn(redis, a) == 4
    assert 0 < await redis.ttl(Keys.cancelled_turn(a)) <= CANCELLED_TTL_S
    for turn in (3, 4):
        w = await hub.watch(a, turn)
        assert w.cancelled and w.reason == "cancelled before start"
    assert not (await hub.watch(a, 5)).cancelled
    assert not (await hub.watch(b, 4)).cancelled


async def test_malformed_cancels_are_ignored_and_the_hub_keeps_working(
    hub: CancelHub, redis: aioredis.Redis, uid: str
) -> None:
    sid = f"m-{uid}"
    w = await hub.watch(sid, 2)
    channel = Keys.cancel_channel(sid)
    await redis.publish(channel, b"\xc1 not msgpack")
    await redis.publish(channel, encode(Interrupt(session=sid, turn=2)))  # valid message, wrong type
    await redis.publish(channel, b"")
    await sentinel(hub, redis, f"s-{uid}")
    assert not w.cancelled
    await publish_cancel(redis, Cancel(session=sid, turn=2))
    assert await fired(w)


async def test_unwatched_job_is_not_fired(hub: CancelHub, redis: aioredis.Redis, uid: str) -> None:
    sid = f"u-{uid}"
    kept, dropped = await hub.watch(sid, 1), await hub.watch(sid, 1)
    hub.unwatch(dropped)
    hub.unwatch(dropped)  # twice is harmless
    await publish_cancel(redis, Cancel(session=sid, turn=1))
    assert await fired(kept)
    assert not dropped.cancelled


async def test_cancel_sent_while_the_subscription_was_broken_still_reaches_the_job(
    embedded_redis: EmbeddedRedis, uid: str
) -> None:
    redis = connect(embedded_redis.url)
    other = connect(embedded_redis.url)
    hub = CancelHub(redis)
    try:
        await asyncio.wait_for(hub.start(), 10)
        sid = f"r-{uid}"
        w = await hub.watch(sid, 1)
        # Drop the hub's pub/sub connection and cancel before it can reconnect: the message
        # itself is lost, only the recorded cancelled turn survives.
        async with other.pipeline(transaction=True) as pipe:
            pipe.client_kill_filter(_type="pubsub")
            pipe.set(Keys.cancelled_turn(sid), 1)
            pipe.publish(Keys.cancel_channel(sid), encode(Cancel(session=sid, turn=1)))
            killed, _, receivers = await pipe.execute()
        assert killed == 1 and receivers == 0
        assert await fired(w, timeout=10), "a cancel published during the reconnect was never delivered"
        later = await hub.watch(sid, 2)
        await publish_cancel(other, Cancel(session=sid, turn=2, reason="after"))
        assert await fired(later) and later.reason == "after"
    finally:
        await hub.aclose()
        await redis.aclose()
        await other.aclose()


@pytest.mark.parametrize("turn", [0, 7])
async def test_publish_cancel_records_the_turn_and_reaches_subscribers(
    hub: CancelHub, redis: aioredis.Redis, uid: str, turn: int
) -> None:
    sid = f"p-{uid}"
    w = await hub.watch(sid, turn)
    assert await publish_cancel(redis, Cancel(session=sid, turn=turn)) >= 1
    assert await cancelled_turn(redis, sid) == turn
    assert await fired(w)
