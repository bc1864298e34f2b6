"""Session ids name one call, ever: a reused id is refused, across bridges, and nothing of an old call
reaches a new one (tests against real Redis and, for the HTTP status, the real signaling server)."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from bridge.core import Bridge, SessionExists
from shared.protocol import AudioFrame, Keys, Transcript, entry, frame_entry_id
from tests.support.bridge import OfferRefused, RtcClient, delete_session_keys, pools_config, running_bridge


async def test_an_ended_call_s_id_is_never_reused(redis_url: str, redis: aioredis.Redis, uid: str) -> None:
    sid = f"alice-{uid}"
    bridge = Bridge(redis_url, pools_config())
    await bridge.start()
    try:
        session = await bridge.open_session(sid, transport="test")
        await redis.xadd(Keys.events(sid), entry(Transcript(session=sid, turn=0, text="my PIN is 1234")))
        await bridge.close_session(session.id)
        with pytest.raises(SessionExists, match="never reused"):
            await bridge.open_session(sid, transport="test")
    finally:
        await bridge.aclose()
        await delete_session_keys(redis_url, [sid])


async def test_two_bridges_cannot_share_a_live_id(redis_url: str, uid: str) -> None:
    sid = f"support-{uid}"
    first, second = Bridge(redis_url, pools_config()), Bridge(redis_url, pools_config())
    await first.start()
    await second.start()
    try:
        await first.open_session(sid, transport="test")
        with pytest.raises(SessionExists):
            await second.open_session(sid, transport="test")
        assert sid not in second.sessions
    finally:
        await first.aclose()
        await second.aclose()
        await delete_session_keys(redis_url, [sid])


async def test_keys_left_under_an_unclaimed_id_never_reach_a_new_call(redis_url: str, redis: aioredis.Redis,
                                                                      uid: str) -> None:
    """Old streams whose claim is gone (older than any claim) are not this call's: they are dropped."""
    sid = f"old-{uid}"
    await redis.xadd(Keys.audio_in(sid), entry(AudioFrame(session=sid, seq=0, pcm=b"\x01\x00" * 320)),
                     id=frame_entry_id(0))
    await redis.xadd(Keys.events(sid), entry(Transcript(session=sid, turn=0, text="someone else's words")))
    bridge = Bridge(redis_url, pools_config())
    await bridge.start()
    try:
        await bridge.open_session(sid, transport="test")
        assert await redis.xlen(Keys.audio_in(sid)) == 0 and await redis.xlen(Keys.events(sid)) == 0
    finally:
        await bridge.aclose()
        await delete_session_keys(redis_url, [sid])


async def test_signaling_answers_409_for_a_used_id(redis_url: str) -> None:
    sid = f"bob-{uuid.uuid4().hex[:8]}"
    async with running_bridge(redis_url, pools_config()) as (bridge, transport):
        first = RtcClient(transport.url)
        await first.connect(session_id=sid)
        await first.aclose()
        await bridge.close_session(sid)
        second = RtcClient(transport.url)
        try:
            with pytest.raises(OfferRefused) as refused:
                await second.connect(session_id=sid)
            assert refused.value.status == 409 and refused.value.body["error"] == "session_exists"
            fresh = await second.connect()  # the default: a server-generated id
            assert fresh["session_id"] != sid
        finally:
            await second.aclose()
