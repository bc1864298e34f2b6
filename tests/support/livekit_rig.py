"""The harness of the LiveKit transport tests: a real Bridge, a job thread, and a call in a room double.

- `JobThread`: a thread running its own event loop, as livekit-agents' THREAD executor runs a job.
- `start_rig`: a `LiveKitCall` started in such a thread in a `RoomDouble` (tests/support/livekit.py)
  whose caller was already there, microphone subscribed, before the call started (the usual real path).
- `agent_turn`: what the workers would write for one turn (transcript, tokens, audio).
The fixtures over these are in tests/support/livekit_fixtures.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import redis.asyncio as aioredis
from livekit import rtc

from bridge.core import Bridge
from bridge.transports.livekit_io import BridgeLink, CallOptions, LiveKitCall
from shared.bus import BatchPublisher, check_entry
from shared.config import Config, parse_config
from shared.protocol import AudioOut, Keys, SpeechEnd, SpeechStart, TokenChunk, Transcript, output_entry_id
from tests.support.livekit import RemoteParticipantDouble, RoomDouble, caller_mic

T = TypeVar("T")
OUT_RATE = 48_000
OUT_FRAME = OUT_RATE * 20 // 1000
MAX_SESSIONS = 4


class JobThread:
    """A thread running its own event loop, as livekit-agents runs each job (THREAD executor)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="job-thread", daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def invoke() -> T:
            return fn(*args)
        return await self.run(invoke())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def make_config(uid: str, max_sessions: int = MAX_SESSIONS) -> Config:
    pools = {f"asr-{uid}": {"stage": "asr", "engine": "faster-whisper"},
             f"llm-{uid}": {"stage": "llm", "engine": "llamacpp"},
             f"tts-{uid}": {"stage": "tts", "engine": "piper"}}
    return parse_config({"pools": pools, "bridge": {"max_sessions": max_sessions}}, "test_livekit")


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def entries(redis: aioredis.Redis, key: str) -> list[Any]:
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(key))
    return [check_entry(key, fields) for _, fields in rows]


def spy_captures(call: LiveKitCall) -> list[tuple[float, int, int]]:
    """Wrap the call's real AudioSource.capture_frame: records (monotonic, samples, level) per frame,
    level = the frame's constant sample value (0 silence, -1 not constant). Run on the job loop."""
    captured: list[tuple[float, int, int]] = []
    real = call.source.capture_frame

    async def capture(frame: rtc.AudioFrame) -> None:
        pcm = np.frombuffer(frame.data, dtype=np.int16)
        level = int(pcm[0]) if pcm.size and pcm.min() == pcm.max() else -1
        captured.append((time.monotonic(), frame.samples_per_channel, level))
        await real(frame)

    call.source.capture_frame = capture  # type: ignore[method-assign]
    return captured


@dataclass
class CallRig:
    job: JobThread
    room: RoomDouble
    caller: RemoteParticipantDouble
    mic: rtc.AudioSource
    link: BridgeLink
    call: LiveKitCall
    ended: list[str] = field(default_factory=list)

    async def act(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.room.act(fn, *args)

    async def packet(self, data: bytes, sender: RemoteParticipantDouble | None, topic: str = "control") -> None:
        await self.act(self.room.send_data, sender, data, topic)


async def start_rig(bridge: Bridge, job: JobThread, uid: str, *, options: CallOptions | None = None,
                    hears_agent: bool = True, in_start: Callable[[RoomDouble], Any] | None = None) -> CallRig:
    """A call whose caller joined, microphone subscribed, before it started. `in_start(room)`
    runs on the job loop while the call publishes its track (i.e. during the call's start)."""
    room = RoomDouble(f"room-{uid}")
    room.loop = job.loop
    mic, track = await job.call(caller_mic)
    caller = room.join(f"caller-{uid}", track, subscribed=True, hears_agent=hears_agent)  # before the agent: no events
    room.connection_state = rtc.ConnectionState.CONN_CONNECTED  # the agent is in the room
    if in_start is not None:
        room.local_participant.while_publishing_track = lambda: in_start(room)
    ended: list[str] = []
    link = BridgeLink(bridge, asyncio.get_running_loop())
    call = await job.run(LiveKitCall.start(room, caller, link, sid=f"lk-{uid}",  # type: ignore[arg-type]
                                           options=options or CallOptions(out_rate=OUT_RATE), on_end=ended.append))
    return CallRig(job, room, caller, mic, link, call, ended)


async def open_turn(bridge: Bridge, sid: str, turn_frames: int = 10) -> None:
    """The caller spoke and stopped: the VAD's events for turn 0, as the bridge's ingest would feed them."""
    session = bridge.sessions[sid]
    await session.on_vad(SpeechStart(session=sid, frame=0))
    await session.on_vad(SpeechEnd(session=sid, start_frame=0, end_frame=turn_frames))


async def agent_turn(bridge: Bridge, publisher: BatchPublisher, sid: str, seconds: float, level: int,
                     tokens: tuple[str, ...] = ()) -> None:
    """What the workers would write for turn 0: a final transcript, the reply's tokens, then
    `seconds` of agent audio whose samples all equal `level` (each captured frame tells which audio it is)."""
    await open_turn(bridge, sid)
    await publisher.publish(Keys.events(sid), Transcript(session=sid, turn=0, text="hello there"))
    for seq, text in enumerate(tokens):
        await publisher.publish(Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=seq, text=text,
                                                             final=seq == len(tokens) - 1),
                                entry_id=output_entry_id(0, seq))
    total = round(seconds * OUT_RATE)
    chunk = OUT_RATE  # 1 s per chunk
    for seq, start in enumerate(range(0, total, chunk)):
        n = min(chunk, total - start)
        msg = AudioOut(session=sid, turn=0, seq=seq, pcm=np.full(n, level, np.int16).tobytes(), rate=OUT_RATE,
                       final=start + n >= total, text="one two three four five" if seq == 0 else "")
        await publisher.publish(Keys.audio_out(sid), msg, entry_id=output_entry_id(0, seq))


async def speak(job: JobThread, mic: rtc.AudioSource, frames: int, level: int = 0) -> None:
    """`frames` 20 ms frames into a caller's microphone (on the job loop, where it was made)."""
    frame = rtc.AudioFrame(np.full(OUT_FRAME, level, np.int16).tobytes(), OUT_RATE, 1, OUT_FRAME)

    async def feed() -> None:
        for _ in range(frames):
            await mic.capture_frame(frame)

    await job.run(feed())
