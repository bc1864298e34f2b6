"""LiveKit transport (bridge.transports.livekit_agent / livekit_io) against the real SDK.

No LiveKit server can run here, so the ROOM is a double (`RoomDouble`,
tests/support/livekit.py): the SDK's own EventEmitter emitting the Room's
events with real `rtc.DataPacket`s, as strict as rtc 1.1.21's Room about
participants, subscriptions, disconnect reasons and data limits. Everything
else is real: the calls run on a real Bridge (shared Redis, real Silero VAD),
in a job thread with its own event loop as livekit-agents' THREAD executor
runs them; caller audio is a real `rtc.AudioSource` + `LocalAudioTrack` read
by the transport's real `rtc.AudioStream`; agent audio goes into the
transport's real `rtc.AudioSource` (a spy wraps its capture_frame to record
what was captured, and when); tokens use the real `api.AccessToken`. The
worker test runs the real `AgentServer` unregistered and launches a fake job
through its THREAD executor, in a room double instead of the SDK's mock room.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from livekit import api, rtc

from bridge.core import Bridge
from bridge.transports.livekit_agent import LiveKitSettings, LiveKitTransport, caller_token, pools_from_metadata
from shared.bus import BatchPublisher
from shared.caller_audio import to_pcm
from shared.config import ConfigError
from shared.protocol import (
    FRAME_MS,
    AsrJob,
    AudioFrame,
    AudioOut,
    Interrupt,
    Keys,
    OpusFrame,
    SpeechEnd,
    SpeechStart,
    output_entry_id,
)
from tests.engines.speech import pad_silence, speech_bounds, synthesize_16k
from tests.support.livekit import Reason, RoomDouble, caller_mic, rooms_for_fake_jobs
from tests.support.livekit_rig import OUT_FRAME, OUT_RATE, CallRig, agent_turn, entries, spy_captures, until

pytest_plugins = ("tests.support.livekit_fixtures",)  # the fixtures: bridge, job, publisher, rig

SECRET = "s" * 40  # >= 32 bytes: no InsecureKeyLengthWarning from PyJWT


async def test_caller_audio_reaches_session_vad_and_asr_job(rig: CallRig, redis: aioredis.Redis, uid: str) -> None:
    """Real speech captured into the caller's LocalAudioTrack at 48 kHz (subscribed before the call
    started: the transport adopts it) comes out of the transport's rtc.AudioStream (16 kHz, 20 ms),
    lands in the session's audio.in through the real Bridge, and the real Silero VAD ends the turn
    with an ASR job covering the speech."""
    speech = synthesize_16k("Thank you very much for your help.")
    audio16 = pad_silence(speech, 0.3, 0.7)
    resampler = rtc.AudioResampler(16_000, OUT_RATE, num_channels=1)
    audio48 = np.concatenate([np.frombuffer(f.data, np.int16) for f in
                              resampler.push(bytearray(audio16.tobytes())) + resampler.flush()])
    # another participant's audio is not the caller's: never read
    _, other_mic = await rig.job.call(caller_mic)
    await rig.act(rig.room.join, "other", other_mic)
    await asyncio.sleep(0.05)

    async def speak() -> None:
        for i in range(0, len(audio48) - OUT_FRAME + 1, OUT_FRAME):
            await rig.mic.capture_frame(rtc.AudioFrame(audio48[i:i + OUT_FRAME].tobytes(), OUT_RATE, 1, OUT_FRAME))

    await rig.job.run(speak())
    sid = rig.call.id
    job_key = Keys.pool_jobs(f"asr-{uid}")

    async def asr_jobs() -> list[Any]:
        return await entries(redis, job_key)

    deadline = time.monotonic() + 5
    while not await asr_jobs() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    jobs = await asr_jobs()
    assert len(jobs) == 1 and isinstance(jobs[0], AsrJob) and jobs[0].session == sid, jobs
    events = [e for e in await entries(redis, Keys.events(sid)) if isinstance(e, (SpeechStart, SpeechEnd))]
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd], events

    frames = await entries(redis, Keys.audio_in(sid))
    assert all(isinstance(f, AudioFrame | OpusFrame) for f in frames)
    assert [f.seq for f in frames] == list(range(len(frames)))  # one frame per 20 ms, none lost
    assert rig.call.caller_frames >= len(audio16) // 320 - 5
    # the speech sits where it was spoken: voiced frames span the utterance (resampling, coding aside)
    pcm = to_pcm(frames)
    first, last = speech_bounds(audio16)
    got_first, got_last = speech_bounds(pcm)
    assert abs((got_last - got_first) - (last - first)) <= 0.06 * 16_000, ((got_first, got_last), (first, last))
    end = events[1]
    assert isinstance(end, SpeechEnd) and jobs[0].start_seq == end.start_frame and jobs[0].end_seq == end.end_frame
    voiced_ms = (end.end_frame - end.start_frame + 1) * FRAME_MS
    assert abs(voiced_ms - (last - first) / 16) <= 200, (voiced_ms, (last - first) / 16)


async def test_agent_audio_tokens_and_control(rig: CallRig, bridge: Bridge, publisher: BatchPublisher) -> None:
    """Agent audio leaves through the real AudioSource (200 ms queue) in 20 ms frames, in order, and the
    published LocalAudioTrack carries it; tokens go lossy on `llm_tokens`, session metadata reliable on `control`."""
    sid = rig.call.id
    local = rig.room.local_participant
    assert local.tracks == [rig.call.track] and rig.call.options.queue_ms == 200
    captured = await rig.job.call(spy_captures, rig.call)
    heard: list[int] = []

    async def listen() -> None:  # what a subscriber of the agent track receives
        stream = rtc.AudioStream(rig.call.track, sample_rate=OUT_RATE, num_channels=1, frame_size_ms=20)
        try:
            async for event in stream:
                heard.append(int(np.median(np.frombuffer(event.frame.data, np.int16))))
        finally:
            await stream.aclose()

    listener = asyncio.run_coroutine_threadsafe(listen(), rig.job.loop)
    await agent_turn(bridge, publisher, sid, 0.4, level=1000, tokens=("Hi", " there", "!"))
    await until(lambda: rig.call.frames_out >= 20 and bridge.sessions[sid].state.value == "listening",
                what="20 agent frames played")
    await until(lambda: sum(1 for v in heard if v == 1000) >= 15, what="agent audio on the published track")
    listener.cancel()
    await asyncio.sleep(0.05)  # let the listener close its stream on the job loop

    agent = [c for c in list(captured) if c[2] != 0]
    assert [c[2] for c in agent] == [1000] * 20 and all(c[1] == OUT_FRAME for c in captured)
    gaps = np.diff([c[0] for c in agent[12:]])  # past the source's 200 ms queue fill: paced by the media clock
    assert 0.012 < float(np.median(gaps)) < 0.028, gaps

    tokens = local.on_topic("llm_tokens")
    assert [t for t, _ in tokens] == [{"t": 0, "s": 0, "d": "Hi", "f": False}, {"t": 0, "s": 1, "d": " there", "f": False},
                                      {"t": 0, "s": 2, "d": "!", "f": True}]
    assert not any(reliable for _, reliable in tokens)
    control = local.on_topic("control")
    assert all(reliable for _, reliable in control)
    kinds = [m["type"] for m, _ in control]
    assert kinds[0] == "session" and control[0][0]["session"] == sid
    states = [m["state"] for m, _ in control if m["type"] == "state"]
    assert states[-3:] == ["thinking", "agent_speaking", "listening"], states
    assert any(m["type"] == "turn_metrics" and m["agent_text"] == "Hi there!" for m, _ in control)


async def test_interrupt_flushes_playout_at_once(rig: CallRig, bridge: Bridge, publisher: BatchPublisher,
                                                 redis: aioredis.Redis) -> None:
    """The caller's `{"type":"interrupt"}` on `control` calls session.interrupt: no frame of the
    cancelled turn is captured after it, the source's queue is cleared, late chunks are refused."""
    sid = rig.call.id
    captured = await rig.job.call(spy_captures, rig.call)
    await agent_turn(bridge, publisher, sid, 3.0, level=1000)
    await until(lambda: rig.call.frames_out >= 10, what="agent speaking")

    def interrupt_now() -> tuple[int, float]:  # on the job loop: the capture index at the interrupt, exactly
        rig.room.send_data(rig.caller, b'{"type":"interrupt"}')
        return len(captured), rig.call.source.queued_duration

    cut, queued_after = await rig.job.call(interrupt_now)
    assert queued_after == 0.0  # buffered agent audio dropped at once
    session = bridge.sessions[sid]
    await until(lambda: session.state.value == "listening" and rig.call.silence_out > 0, what="interrupt handled")
    # a late chunk of the cancelled turn (a TTS job still running) is refused
    late = AudioOut(session=sid, turn=0, seq=9, pcm=np.full(OUT_FRAME * 5, 1000, np.int16).tobytes(), rate=OUT_RATE)
    await publisher.publish(Keys.audio_out(sid), late, entry_id=output_entry_id(0, 9))
    await asyncio.sleep(0.3)

    after = [level for _, _, level in list(captured)[cut:]]
    assert len(after) >= 10 and set(after) == {0}, after
    assert rig.call.interrupts == 1 and session.playout.stale_frames == 0 and session.playout.queued == 0
    assert rig.call.frames_out < 150  # 3 s of audio were queued; most never played
    interrupts = [e for e in await entries(redis, Keys.events(sid)) if isinstance(e, Interrupt)]
    assert [(e.source, e.turn) for e in interrupts] == [("client", 0)]
    assert await redis.get(Keys.cancelled_turn(sid)) == b"0"
    control = [m for m, _ in rig.room.local_participant.on_topic("control")]
    assert any(m["type"] == "interrupted" and m["turn"] == 0 and m["source"] == "client" for m in control)


async def test_hostile_and_foreign_packets_are_counted_and_ignored(rig: CallRig, bridge: Bridge, publisher: BatchPublisher,
                                                                   counter: Callable[..., float]) -> None:
    """Oversized, malformed and unknown control packets are counted (CONTROL_REJECTED) and change
    nothing; an interrupt from another participant (or the server) has no effect either."""
    sid = rig.call.id
    await agent_turn(bridge, publisher, sid, 3.0, level=1000)
    await until(lambda: rig.call.frames_out >= 5, what="agent speaking")
    reasons = ["too_large", "bad_json", "not_object", "bad_type", "unknown_type", "not_caller"]
    before = {r: counter("voxbus_control_rejected_total", reason=r) for r in reasons}

    interrupt = b'{"type":"interrupt"}'
    await rig.packet(b'{"type":"interrupt","pad":"' + b"x" * 5000 + b'"}', rig.caller)
    await rig.packet(b"{not json", rig.caller)
    await rig.packet(b"\xff\xfe\x00garbage", rig.caller)
    await rig.packet(b"[1, 2, 3]", rig.caller)
    await rig.packet(b'{"type": 5}', rig.caller)
    await rig.packet(b'{"type":"self_destruct"}', rig.caller)
    intruder = await rig.act(rig.room.join, "intruder")
    await rig.packet(interrupt, intruder)
    await rig.packet(interrupt, None)  # sent by a server SDK
    await rig.packet(interrupt, rig.caller, topic="chat")  # not the control topic: not ours
    await rig.packet(b'{"type":"ping","id":7}', rig.caller)

    frames_then = rig.call.frames_out
    await until(lambda: rig.call.frames_out >= frames_then + 10, what="playout going on")
    session = bridge.sessions[sid]
    assert rig.call.interrupts == 0 and session.state.value == "agent_speaking" and session.playout.queued > 0
    delta = {r: counter("voxbus_control_rejected_total", reason=r) - before[r] for r in reasons}
    assert delta == {"too_large": 1, "bad_json": 2, "not_object": 1, "bad_type": 1, "unknown_type": 1, "not_caller": 2}
    await until(lambda: any(m["type"] == "pong" for m, _ in rig.room.local_participant.on_topic("control")),
                what="pong")
    assert rig.call.stats()["control_rejected"]["not_caller"] == 2


async def test_caller_hanging_up_ends_the_call(rig: CallRig, bridge: Bridge) -> None:
    """Someone else leaving changes nothing; the caller hanging up (CLIENT_INITIATED) ends the call:
    on_end (ctx.shutdown in a job) is told why and the session is closed on the bridge."""
    sid = rig.call.id
    await rig.act(rig.room.join, "someone-else")
    await rig.act(rig.room.leave, "someone-else", Reason.CLIENT_INITIATED)
    await asyncio.sleep(0.05)
    assert sid in bridge.sessions and rig.ended == []
    await rig.act(rig.room.leave, rig.caller.identity, Reason.CLIENT_INITIATED)
    await until(lambda: sid not in bridge.sessions and rig.call.closed.is_set(), what="call closed")
    assert rig.ended == ["caller left (CLIENT_INITIATED)"]


async def test_session_closed_by_the_bridge_ends_the_call(rig: CallRig, bridge: Bridge) -> None:
    """A bridge that closes the session (stopping) ends the call and, through on_end, its job."""
    await bridge.close_session(rig.call.id)
    await until(rig.call.closed.is_set, what="call closed")
    assert rig.ended == ["session closed by the bridge"]


def test_access_token_grants_the_room() -> None:
    """caller_token (livekit.api.AccessToken) signs a JWT that joins exactly that room; with an
    agent name it also dispatches that agent."""
    settings = LiveKitSettings("wss://lk.example", "APIkey123", SECRET)
    token = caller_token(settings, "room-1", "alice")
    claims = api.TokenVerifier("APIkey123", SECRET).verify(token)
    assert claims.identity == "alice" and claims.video is not None
    assert claims.video.room_join and claims.video.room == "room-1" and claims.video.can_publish_data
    assert claims.room_config is None
    with pytest.raises(Exception):  # noqa: B017  (the SDK raises jwt's own error types)
        api.TokenVerifier("APIkey123", "another-secret-of-thirty-two-bytes!!").verify(token)
    dispatched = caller_token(LiveKitSettings("wss://lk.example", "APIkey123", SECRET, "voxbus"), "room-2", "bob")
    room_config = api.TokenVerifier("APIkey123", SECRET).verify(dispatched).room_config
    assert room_config is not None and [a.agent_name for a in room_config.agents] == ["voxbus"]


def test_settings_come_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="LIVEKIT_API_KEY, LIVEKIT_API_SECRET"):
        LiveKitSettings.from_env({"LIVEKIT_URL": "wss://lk.example"})
    with pytest.raises(ConfigError, match="LIVEKIT_URL"):
        LiveKitSettings.from_env({"LIVEKIT_URL": "lk.example", "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s"})
    env = {"LIVEKIT_URL": "wss://lk.example", "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "hush-hush",
           "LIVEKIT_AGENT_NAME": "voxbus"}
    settings = LiveKitSettings.from_env(env)
    assert (settings.url, settings.agent_name) == ("wss://lk.example", "voxbus") and "hush" not in repr(settings)
    assert (settings.drain_timeout_s, settings.reconnect_grace_s) == (600.0, 20.0)
    tuned = LiveKitSettings.from_env({**env, "VOXBUS_LIVEKIT_DRAIN_TIMEOUT_S": "90",
                                      "VOXBUS_LIVEKIT_RECONNECT_GRACE_S": "30"})
    assert (tuned.drain_timeout_s, tuned.reconnect_grace_s) == (90.0, 30.0)
    with pytest.raises(ConfigError, match="VOXBUS_LIVEKIT_RECONNECT_GRACE_S"):
        LiveKitSettings.from_env({**env, "VOXBUS_LIVEKIT_RECONNECT_GRACE_S": "-1"})
    assert pools_from_metadata("") is None and pools_from_metadata('{"pools": {"asr": "a"}}') == {"asr": "a"}
    with pytest.raises(ValueError):
        pools_from_metadata('{"pools": ["asr"]}')


async def test_worker_runs_jobs_in_threads_on_the_bridge(bridge: Bridge, redis: aioredis.Redis,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The real AgentServer built from build_worker_options, unregistered (no server here), runs a
    fake job in its THREAD executor with the real JobContext (connect, wait_for_participant), in a room
    double where the caller waits, microphone subscribed: the entrypoint opens a `livekit` session on this
    process's bridge across loops, reads the caller's audio, and stopping the worker closes it."""
    mics: list[rtc.AudioSource] = []

    def room_with_caller() -> RoomDouble:
        room = RoomDouble("voxbus-test")
        mic, track = caller_mic()
        mics.append(mic)
        room.join("caller", track, subscribed=True)
        return room

    rooms = rooms_for_fake_jobs(monkeypatch, room_with_caller)

    async def talk() -> None:  # on the job's loop, where the microphone was made
        for _ in range(25):
            await mics[0].capture_frame(rtc.AudioFrame(bytes(2 * OUT_FRAME), OUT_RATE, 1, OUT_FRAME))

    transport = LiveKitTransport(bridge, settings=LiveKitSettings("ws://127.0.0.1:9", "key", SECRET), port=0,
                                 register=False, drain_timeout_s=0)
    await transport.start()
    sid = ""
    try:
        assert transport.server is not None
        await transport.server.simulate_job("voxbus-test", fake_job=True)
        await until(lambda: len(bridge.sessions) == 1, what="the job's session")
        sid = next(iter(bridge.sessions))
        assert sid.startswith("lk-") and (await redis.get(Keys.meta(sid))) is not None
        await until(lambda: len(rooms[0].local_participant.tracks) == 1, what="the agent's track")
        assert len(rooms) == 1 and rooms[0].connects == 1
        loop = rooms[0].loop_()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(talk(), loop))
        deadline = time.monotonic() + 5
        while not await redis.xlen(Keys.audio_in(sid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await redis.xlen(Keys.audio_in(sid)) > 0  # the caller's track, subscribed before the agent came
        assert transport.stats()["slots"] == 1
    finally:
        await transport.aclose()
        if sid:
            await redis.delete(*Keys.session_streams(sid), Keys.ctx(sid), Keys.meta(sid))
            await redis.zrem(Keys.SESSIONS, sid)
    assert bridge.sessions == {} and len(transport.slots) == 0
