"""A LiveKit call's caller, room and data packets (bridge.transports.livekit_io / livekit_link).

No LiveKit server can run here, so the room is `RoomDouble` (tests/support/livekit.py),
as strict as rtc 1.1.21's Room: disconnect reasons, returning callers as new
participants, track_unsubscribed with track=None, subscriptions that take a
round trip, publish_data that fails, hangs, waits out a reconnection and
enforces the SDK's size limit. The call is real and runs in a job thread on a
real Bridge (shared Redis, real Silero VAD).
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from livekit import rtc
from livekit.rtc.participant import PublishDataError

from bridge.core import Bridge
from bridge.transports.livekit_link import MAX_PACKET_BYTES, TEXT_CAP_CHARS, LiveKitSink
from bridge.transports.livekit_room import CallOptions
from shared.bus import BatchPublisher
from tests.support.livekit import MAX_MESSAGE_SIZE, Reason, RoomDouble, caller_mic, packets_on
from tests.support.livekit_rig import OUT_RATE, CallRig, JobThread, agent_turn, speak, start_rig, until

pytest_plugins = ("tests.support.livekit_fixtures",)  # the fixtures: bridge, job, publisher, rig

DROPS = [Reason.SIGNAL_CLOSE, Reason.CONNECTION_TIMEOUT, Reason.DUPLICATE_IDENTITY, Reason.UNKNOWN_REASON]


def options(**kw: float) -> CallOptions:
    return CallOptions(out_rate=OUT_RATE, **kw)  # type: ignore[arg-type]


async def close(r: CallRig) -> None:
    await r.job.run(r.call.aclose("test over"))
    assert r.room.local_participant.oversize == []


async def test_a_dropped_caller_who_comes_back_resumes_the_call(bridge: Bridge, job: JobThread, uid: str,
                                                               publisher: BatchPublisher) -> None:
    """Finding 10. A caller whose connection drops (not a hang-up) keeps the call: the session stays, the
    job is not ended, the agent stops playing; the same identity returning (a new participant, a new
    microphone) resumes it: the rest of the reply plays and the new microphone is heard."""
    r = await start_rig(bridge, job, uid, options=options(reconnect_grace_s=10))
    try:
        sid = r.call.id
        await agent_turn(bridge, publisher, sid, 3.0, level=1000)
        await until(lambda: r.call.frames_out >= 10, what="agent speaking")
        await r.act(r.room.leave, r.caller.identity, Reason.SIGNAL_CLOSE)
        await asyncio.sleep(0.3)
        paused_at = r.call.frames_out
        await asyncio.sleep(0.5)
        assert r.ended == [] and sid in bridge.sessions and not r.call.closed.is_set()
        assert r.call.frames_out - paused_at <= 2, "the agent went on talking to nobody"

        mic, track = await job.call(caller_mic)
        await r.act(r.room.join, r.caller.identity, track)
        await until(lambda: r.call.frames_out >= paused_at + 20, what="the reply resumed")
        frames_before = r.call.caller_frames
        await speak(job, mic, 20)
        await until(lambda: r.call.caller_frames >= frames_before + 10, what="the new microphone heard")
        assert r.call.reconnects == 1 and r.ended == []
        resumed = [m for m in packets_on(r.room, "control") if m["type"] == "session" and m.get("resumed")]
        assert resumed and resumed[0]["session"] == sid
        await job.run(mic.aclose())
    finally:
        await close(r)


@pytest.mark.parametrize("reason", DROPS[:2], ids=lambda r: rtc.DisconnectReason.Name(r))
async def test_a_caller_who_does_not_come_back_ends_the_call_after_the_grace(
        bridge: Bridge, job: JobThread, uid: str, reason: int) -> None:
    """Finding 10. Without the same identity back within `reconnect_grace_s`, the call ends then (not before)."""
    r = await start_rig(bridge, job, uid, options=options(reconnect_grace_s=0.8))
    try:
        t0 = time.monotonic()
        await r.act(r.room.leave, r.caller.identity, reason)
        await asyncio.sleep(0.5)
        assert r.ended == [] and r.call.id in bridge.sessions
        await until(r.call.closed.is_set, what="call ended after the grace")
        assert r.ended == ["caller did not come back within 0.8 s"] and time.monotonic() - t0 >= 0.75
        assert r.call.id not in bridge.sessions
    finally:
        await close(r)


@pytest.mark.parametrize("reason", [Reason.CLIENT_INITIATED, Reason.ROOM_DELETED, Reason.USER_REJECTED],
                         ids=lambda r: rtc.DisconnectReason.Name(r))
async def test_a_hang_up_ends_the_call_at_once(bridge: Bridge, job: JobThread, uid: str,
                                               reason: rtc.DisconnectReason.ValueType) -> None:
    """A client-initiated leave, a deleted room or a rejected user end the call without waiting."""
    r = await start_rig(bridge, job, uid, options=options(reconnect_grace_s=30))
    try:
        await r.act(r.room.leave, r.caller.identity, reason)
        await until(r.call.closed.is_set, what="call ended", timeout=2)
        assert r.ended == [f"caller left ({rtc.DisconnectReason.Name(reason)})"]
    finally:
        await close(r)


async def test_the_agent_losing_the_room_ends_the_call(rig: CallRig) -> None:
    """The agent's own connection: `reconnecting`/`reconnected` keep the call; `disconnected` ends it."""
    await rig.act(rig.room.reconnecting)
    await asyncio.sleep(0.1)
    await rig.act(rig.room.reconnected)
    assert rig.ended == []
    await rig.act(rig.room.server_disconnect, Reason.ROOM_DELETED)
    await until(rig.call.closed.is_set, what="call ended")
    assert rig.ended == ["room disconnected (ROOM_DELETED)"]


async def test_events_during_the_start_are_not_missed(bridge: Bridge, job: JobThread, uid: str) -> None:
    """Finding 11. What the room says while the call starts (the session opening, the track publishing)
    reaches the call: a ping gets its pong, and a caller who hangs up meanwhile ends the call."""
    def ping(room: RoomDouble) -> None:
        room.send_data(room.remote_participants[f"caller-{uid}"], b'{"type":"ping","id":1}')

    r = await start_rig(bridge, job, uid, in_start=ping)
    try:
        await until(lambda: any(m["type"] == "pong" and m["id"] == 1 for m in packets_on(r.room, "control")),
                    what="the pong", timeout=3)
    finally:
        await close(r)

    def hang_up(room: RoomDouble) -> None:
        room.leave(f"caller-{uid}-b", Reason.CLIENT_INITIATED)

    r = await start_rig(bridge, job, f"{uid}-b", in_start=hang_up)
    try:
        await until(r.call.closed.is_set, what="call ended", timeout=3)
        assert r.ended == ["caller left (CLIENT_INITIATED)"]
    finally:
        await close(r)


async def test_a_track_unsubscribed_without_its_track_then_a_new_microphone(rig: CallRig) -> None:
    """track_unsubscribed may carry track=None: the reader stops on the publication; a new microphone
    of the caller is read instead."""
    sid = next(iter(rig.caller.track_publications))
    await rig.act(rig.room.unsubscribe, rig.caller.identity, sid)
    await until(lambda: rig.call._reader is None, what="reader stopped")
    mic, track = await rig.job.call(caller_mic)
    await rig.act(rig.room.publish, rig.caller.identity, track)
    before = rig.call.caller_frames
    await speak(rig.job, mic, 20)
    await until(lambda: rig.call.caller_frames >= before + 10, what="the new microphone heard")
    await rig.job.run(mic.aclose())


async def test_first_audio_waits_for_the_callers_subscription(bridge: Bridge, job: JobThread, uid: str,
                                                              publisher: BatchPublisher) -> None:
    """Finding 11. Until the caller subscribes to the agent's track, no agent audio is played (it would be
    lost); once subscribed it plays from the start. The wait is bounded (subscribe_timeout_s)."""
    r = await start_rig(bridge, job, uid, hears_agent=False, options=options(subscribe_timeout_s=30))
    try:
        await agent_turn(bridge, publisher, r.call.id, 1.0, level=1000)
        await asyncio.sleep(0.5)
        assert r.call.frames_out == 0 and r.call.silence_out == 0
        await r.act(r.room.agent_track_subscribed, r.caller.identity)
        await until(lambda: r.call.frames_out >= 20, what="agent audio after the subscription")
    finally:
        await close(r)
    bounded = await start_rig(bridge, job, f"{uid}-b", hears_agent=False, options=options(subscribe_timeout_s=0.3))
    try:
        await until(lambda: bounded.call.silence_out > 0, what="playout after the timeout", timeout=3)
        assert bounded.call.unheard_starts == 1
    finally:
        await close(bounded)


async def test_turn_metrics_stay_small(rig: CallRig, bridge: Bridge, publisher: BatchPublisher) -> None:
    """Finding 11. turn_metrics carries the turn's texts cut to TEXT_CAP_CHARS, not a whole long reply."""
    words = tuple(f" word{i}" for i in range(600))  # ~5 KB of reply text
    await agent_turn(bridge, publisher, rig.call.id, 0.2, level=1000, tokens=words)
    await until(lambda: any(m["type"] == "turn_metrics" and m.get("agent_text") for m in packets_on(rig.room, "control")),
                what="turn_metrics")
    metrics = [m for m in packets_on(rig.room, "control") if m["type"] == "turn_metrics" and m.get("agent_text")]
    assert all(len(m["agent_text"]) <= TEXT_CAP_CHARS and "agent_text" in m["truncated"] for m in metrics)
    assert all(len(orjson.dumps(m)) < 4096 for m in metrics)


async def test_the_sink_is_best_effort(job: JobThread) -> None:
    """Finding 11. The sink never raises and never sends a packet over 15 KiB: oversize messages are
    dropped and counted, failed and stuck sends are counted, and while the room reconnects control
    waits (and is sent once it is back) while tokens are dropped."""
    room = RoomDouble("sink", connected=True)
    room.loop = job.loop
    local = room.local_participant

    async def scenario() -> LiveKitSink:
        sink = LiveKitSink(asyncio.get_running_loop(), publish_timeout_s=0.2)
        runner = asyncio.create_task(sink.run(local))  # type: ignore[arg-type]
        sink.send_control({"type": "note", "pad": "x" * (MAX_PACKET_BYTES + 10)})
        local.fail_data = 1
        sink.send_control({"type": "note", "n": 1})
        await asyncio.sleep(0.05)
        local.hang_data()
        sink.send_control({"type": "note", "n": 2})
        await asyncio.sleep(0.4)
        local.hang_data(False)
        room.reconnecting()
        sink.hold()
        sink.send_control({"type": "note", "n": 3})
        sink.send_tokens(0, 0, "lost", False)
        await asyncio.sleep(0.1)
        assert not local.packets
        room.reconnected()
        sink.resume()
        assert await sink.flush(2.0)
        runner.cancel()
        return sink

    sink = await job.run(scenario())
    assert [orjson.loads(p) for p, _, _, _ in local.packets] == [{"type": "note", "n": 3}]
    assert sink.dropped == {"control_oversize": 1, "control_send_failed": 1, "control_send_timeout": 1,
                            "tokens_offline": 1}, sink.dropped


async def test_the_room_double_is_as_strict_as_the_sdk(job: JobThread) -> None:
    """The double itself: publish_data raises past the SDK's message limit and once disconnected, waits
    out a reconnection; a participant joining twice is refused as by the SDK."""
    room = RoomDouble("strict", connected=True)
    room.loop = job.loop
    local = room.local_participant

    async def scenario() -> None:
        with pytest.raises(PublishDataError, match="exceeds the negotiated maximum message size"):
            await local.publish_data(b"x" * MAX_MESSAGE_SIZE, topic="control")
        room.join("alice")
        with pytest.raises(RuntimeError):
            room.join("alice")
        room.reconnecting()
        pending = asyncio.create_task(local.publish_data(b"{}", topic="control"))
        await asyncio.sleep(0.05)
        assert not pending.done()
        room.reconnected()
        await pending
        room.server_disconnect()
        with pytest.raises(PublishDataError):
            await local.publish_data(b"{}")

    await job.run(scenario())
    assert len(local.packets) == 1
