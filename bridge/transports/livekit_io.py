"""One LiveKit call: the caller in a room <-> one CallSession of the bridge.

livekit-agents runs every job in its own thread with its own event loop (the
THREAD executor, see `livekit_agent`), while the Bridge and its sessions live
on the bridge's loop, where one ingest tick serves every call. So every touch
of a session goes through `BridgeLink` (callbacks on the bridge loop, in FIFO
order), and everything the session says to the caller comes back through
`LiveKitSink` (callbacks on the job loop). Only `livekit.rtc` is used here.

Media: the caller's audio track is read with `rtc.AudioStream` at 16 kHz mono
in 20 ms frames and pushed into the session; agent audio is pulled from the
session one 20 ms frame at a time and captured into an `rtc.AudioSource`
published as the agent's track. The source's small queue paces the pull: a
capture returns when the queue has room again, i.e. on the media clock.

Data: tokens go out lossy on topic `llm_tokens`, session metadata reliable on
`control`; the caller's `control` packets are parsed by the same hostile-input
parser as the WebRTC transport (`channels.ControlChannel`, same wire format).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson
from livekit import rtc

from shared.protocol import SAMPLE_RATE

from .channels import CONTROL_LABEL, TOKENS_LABEL, ControlChannel

if TYPE_CHECKING:
    from ..core import Bridge
    from ..playout import OutFrame
    from ..session import CallSession

log = logging.getLogger("voxbus.livekit")

T = TypeVar("T")

TOKENS_TOPIC = TOKENS_LABEL
CONTROL_TOPIC = CONTROL_LABEL
FRAME_MS = 20
# Lossy data packets larger than one MTU are fragmented and dropped whole on any loss;
# a token payload that big (rare) goes reliable instead.
MAX_LOSSY_BYTES = 1300
CLOSE_TIMEOUT_S = 5.0  # a bridge loop that no longer runs must not hold a job's shutdown


class BridgeLink:
    """The Bridge as seen from a job's event loop.

    Every call is a callback scheduled on the bridge loop with
    call_soon_threadsafe, so calls made in order from one job run in that order
    (an interrupt posted before a frame pull is handled before it).
    """

    def __init__(self, bridge: Bridge, loop: asyncio.AbstractEventLoop) -> None:
        self.bridge = bridge
        self.loop = loop

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the bridge loop; errors are logged there."""
        self.loop.call_soon_threadsafe(_logged, fn, args)

    def call(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run `fn(*args)` on the bridge loop; await its result on the caller's loop."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting loop
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return asyncio.wrap_future(done)

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run a coroutine on the bridge loop; await its result on the caller's loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))


def _logged(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("bridge call %s failed", getattr(fn, "__qualname__", fn))


class LiveKitSink:
    """ClientSink over LiveKit data packets: callable from any thread, sends on the job loop.

    One FIFO keeps tokens and control in the order the session produced them.
    A caller that cannot keep up loses tokens first (they are lossy anyway;
    the final text arrives reliably in `turn_metrics`), then the oldest control.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_pending: int = 512) -> None:
        self._loop = loop
        self._max_pending = max_pending
        self._queue: collections.deque[tuple[bytes, bool, str]] = collections.deque()
        self._wake = asyncio.Event()
        self.sent: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()

    def send_tokens(self, turn: int, seq: int, text: str, final: bool) -> None:
        payload = orjson.dumps({"t": turn, "s": seq, "d": text, "f": final})
        self._post(payload, len(payload) > MAX_LOSSY_BYTES, TOKENS_TOPIC)

    def send_control(self, msg: dict[str, Any]) -> None:
        self._post(orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY), True, CONTROL_TOPIC)

    def _post(self, payload: bytes, reliable: bool, topic: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._enqueue, payload, reliable, topic)
        except RuntimeError:  # the job's loop is closed: the call is over
            self.dropped["call_over"] += 1

    def _enqueue(self, payload: bytes, reliable: bool, topic: str) -> None:
        if len(self._queue) >= self._max_pending:
            if topic == TOKENS_TOPIC:
                self.dropped["tokens_backlog"] += 1
                return
            self._queue.popleft()
            self.dropped["backlog"] += 1
        self._queue.append((payload, reliable, topic))
        self._wake.set()

    async def run(self, participant: rtc.LocalParticipant) -> None:
        """Send queued packets until cancelled; a failed send is counted, never raised."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                payload, reliable, topic = self._queue.popleft()
                try:
                    await participant.publish_data(payload, reliable=reliable, topic=topic)
                    self.sent[topic] += 1
                except Exception as exc:  # PublishDataError while (re)connecting, or a closed room
                    self.dropped[f"{topic}_send_failed"] += 1
                    log.debug("publish_data on %s failed: %s", topic, exc)


@dataclass(frozen=True)
class CallOptions:
    out_rate: int = 48_000  # agent track rate: Opus' native rate, no resampling in the SDK
    queue_ms: int = 60  # agent audio buffered in the AudioSource ahead of the network
    track_name: str = "voxbus-agent"


def session_id_for(room_name: str) -> str:
    """A session id that names its room (readable in Redis) and stays unique per call."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", room_name).strip("-")[:40] or "room"
    return f"lk-{stem}-{uuid.uuid4().hex[:8]}"


class LiveKitCall:
    """One caller's call; build it with `LiveKitCall.start`, end it with `aclose`."""

    def __init__(self, room: rtc.Room, caller: rtc.RemoteParticipant, link: BridgeLink, session: CallSession,
                 sink: LiveKitSink, options: CallOptions, on_end: Callable[[str], Any] | None) -> None:
        self.room = room
        self.caller_identity = caller.identity
        self.caller = caller
        self.link = link
        self.session = session
        self.sink = sink
        self.options = options
        self.on_end = on_end
        cfg = link.bridge.config.bridge
        self.control = ControlChannel(session.id, cfg.max_datachannel_bytes,
                                      on_interrupt=self._interrupt, reply=sink.send_control)
        self.samples_per_frame = options.out_rate * FRAME_MS // 1000
        self.source = rtc.AudioSource(options.out_rate, 1, queue_size_ms=options.queue_ms)
        self.track = rtc.LocalAudioTrack.create_audio_track(options.track_name, self.source)
        self.frames_out = 0  # agent frames captured (silence excluded)
        self.silence_out = 0
        self.stale_dropped = 0  # frames pulled before an interrupt that arrived after it
        self.caller_frames = 0
        self.interrupts = 0
        self.closed = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None
        self._epoch = 0
        self._reader: asyncio.Task[None] | None = None
        self._reader_sid: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: list[tuple[str, Callable[..., None]]] = []

    @property
    def id(self) -> str:
        return self.session.id

    @classmethod
    async def start(cls, room: rtc.Room, caller: rtc.RemoteParticipant, link: BridgeLink, *,
                    options: CallOptions | None = None, pools: dict[str, str] | None = None,
                    sid: str | None = None, on_end: Callable[[str], Any] | None = None) -> LiveKitCall:
        """Open the session, publish the agent track, start media and data.

        Raises what Bridge.open_session raises (TooManySessions, ValueError for a bad pool).
        `on_end(reason)` is called once when the call ends by itself (caller left, room gone).
        """
        options = options or CallOptions()
        sink = LiveKitSink(asyncio.get_running_loop())
        session = await link.run(link.bridge.open_session(
            sid or session_id_for(room.name), pools=pools, sink=sink, transport="livekit", out_rate=options.out_rate))
        try:
            call = cls(room, caller, link, session, sink, options, on_end)
        except BaseException:
            await link.run(link.bridge.close_session(session.id))
            raise
        try:
            await room.local_participant.publish_track(
                call.track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        except BaseException:
            await call.aclose("agent track not published")
            raise
        call._bind()
        sink.send_control({"type": "session", "session": session.id, "ts": time.time()})
        log.info("call %s: caller %s in room %s", call.id, call.caller_identity, room.name)
        return call

    def _bind(self) -> None:
        for event, handler in (("track_subscribed", self._on_track_subscribed),
                               ("track_unsubscribed", self._on_track_unsubscribed),
                               ("data_received", self._on_data),
                               ("participant_disconnected", self._on_participant_disconnected),
                               ("disconnected", self._on_disconnected)):
            self.room.on(event, handler)
            self._handlers.append((event, handler))
        self._spawn(self.sink.run(self.room.local_participant), "sink")
        self._spawn(self._playout(), "playout")
        self._adopt_subscribed_track()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------ caller audio
    def _adopt_subscribed_track(self) -> None:
        """Read an audio track of the caller that was subscribed before we listened for it."""
        for pub in list(self.caller.track_publications.values()):
            if pub.kind == rtc.TrackKind.KIND_AUDIO and pub.track is not None:
                self._on_track_subscribed(pub.track, pub, self.caller)  # type: ignore[arg-type]
                return

    def _on_track_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                             participant: rtc.RemoteParticipant) -> None:
        if participant.identity != self.caller_identity or track.kind != rtc.TrackKind.KIND_AUDIO:
            return
        if self._reader is not None and not self._reader.done():
            log.info("call %s: caller has a second audio track %s; still reading %s", self.id,
                     publication.sid, self._reader_sid)
            return
        self._reader_sid = publication.sid
        self._reader = self._spawn(self._read_caller(track), "caller-audio")

    def _on_track_unsubscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                               participant: rtc.RemoteParticipant) -> None:
        if publication.sid == self._reader_sid and self._reader is not None:
            self._reader.cancel()
            self._reader, self._reader_sid = None, None
            self._adopt_subscribed_track()

    async def _read_caller(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=FRAME_MS)
        try:
            async for event in stream:
                pcm = np.frombuffer(event.frame.data, dtype=np.int16)
                self.link.post(self.session.push_audio, pcm, time.time())
                self.caller_frames += 1
        finally:
            await stream.aclose()

    # ------------------------------------------------------------ agent audio
    async def _playout(self) -> None:
        n = self.samples_per_frame
        rate = self.options.out_rate
        silence = rtc.AudioFrame(bytes(2 * n), rate, 1, n)
        while True:
            epoch = self._epoch
            frame: OutFrame | None = await self.link.call(self.session.next_frame)
            if self.session.closed:  # closed by the bridge (stopping): nothing more to play or hear
                self._end("session closed by the bridge")
                return
            if frame is not None and epoch != self._epoch:
                self.stale_dropped += 1  # pulled before an interrupt that was handled meanwhile
                frame = None
            if frame is None:
                self.silence_out += 1
                await self.source.capture_frame(silence)
                continue
            await self.source.capture_frame(rtc.AudioFrame(frame.pcm, rate, 1, n))
            self.frames_out += 1

    def _interrupt(self) -> None:
        # Posted before any later pull, so the session flushes before the next frame is taken;
        # a pull already in flight is discarded by the epoch, audio already queued by clear_queue.
        self.link.post(self.session.interrupt, "client")
        self._epoch += 1
        self.source.clear_queue()
        self.interrupts += 1

    # ------------------------------------------------------------ data and lifecycle
    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic != CONTROL_TOPIC:
            return  # other topics belong to other room features
        sender = packet.participant
        if sender is None or sender.identity != self.caller_identity:
            self.control.reject("not_caller")
            return
        self.control.handle(packet.data)

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self.caller_identity:
            self._end("caller left")

    def _on_disconnected(self, reason: Any = None) -> None:
        self._end(f"room disconnected ({reason})")

    def _end(self, reason: str) -> None:
        if self._closing is not None:
            return
        self._closing = asyncio.get_running_loop().create_task(self._close(reason))
        if self.on_end is not None:
            try:
                self.on_end(reason)
            except Exception:
                log.exception("call %s: on_end failed", self.id)

    async def aclose(self, reason: str = "closed") -> None:
        """Stop media and data, close the session on the bridge. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(reason))
        await asyncio.shield(self._closing)

    async def _close(self, reason: str) -> None:
        for event, handler in self._handlers:
            self.room.off(event, handler)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.link.run(self.link.bridge.close_session(self.id)), CLOSE_TIMEOUT_S)
        except Exception as exc:  # the bridge is stopping: it closes its sessions itself
            log.warning("call %s: closing the session failed: %s", self.id, exc)
        await self.source.aclose()
        log.info("call %s ended: %s", self.id, reason)
        self.closed.set()

    def stats(self) -> dict[str, Any]:
        return {"session": self.id, "caller": self.caller_identity, "caller_frames": self.caller_frames,
                "frames_out": self.frames_out, "silence_out": self.silence_out, "stale_dropped": self.stale_dropped,
                "interrupts": self.interrupts, "control_rejected": dict(self.control.rejected),
                "sent": dict(self.sink.sent), "sink_dropped": dict(self.sink.dropped)}
