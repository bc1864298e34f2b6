"""One LiveKit call: the caller in a room <-> one CallSession of the bridge.

The call runs on its job's event loop; every touch of the session goes through
`BridgeLink` and everything the session says comes back through `LiveKitSink`
(`livekit_link`). Only `livekit.rtc` is used here.

Media: the caller's audio track is read with `rtc.AudioStream` at 16 kHz mono
in 20 ms frames and pushed into the session; agent audio is pulled from the
session one 20 ms frame at a time and captured into an `rtc.AudioSource`
(200 ms queue, as the framework's RoomIO) published as the agent's track. The
source's queue paces the pull: a capture returns when the queue has room
again, i.e. on the media clock. The first agent audio waits (bounded) until
the caller has subscribed to that track.

Caller presence, as the framework's RoomIO: only a client-initiated leave, a
deleted room or a rejected user ends the call. Any other disconnect (network
drop, signal close, duplicate identity) starts a reconnect grace: the agent
stops playing and waits `reconnect_grace_s` for the same identity to come back,
then resumes the call where it was.

Room events are recorded from before the call starts (`RoomEvents`) and
replayed into it, so nothing fired while the session opened is missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit import rtc

from shared.protocol import SAMPLE_RATE
from shared.tasks import TaskSet

from .channels import ControlChannel
from .livekit_link import CONTROL_TOPIC, TOKENS_TOPIC, BridgeLink, LiveKitSink
from .livekit_room import FINAL_REASONS, ROOM_EVENTS, CallOptions, RoomEvents, reason_name, session_id_for

if TYPE_CHECKING:
    from ..playout import OutFrame
    from ..session import CallSession

__all__ = ["CONTROL_TOPIC", "TOKENS_TOPIC", "BridgeLink", "CallOptions", "LiveKitCall", "LiveKitSink", "RoomEvents",
           "session_id_for"]

log = logging.getLogger("voxbus.livekit")

FRAME_MS = 20
CLOSE_TIMEOUT_S = 5.0  # a bridge loop that no longer runs must not hold a job's shutdown
RESUME_SUBSCRIBE_S = 1.0  # a caller who came back: how long playout waits for the new subscription
HANGUP_FLUSH_S = 1.0  # a call the bridge ends gets this long to send its last control messages
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
        self.loop = asyncio.get_running_loop()
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
        self.reconnects = 0  # times the caller came back after a drop
        self.unheard_starts = 0  # times audio started without the caller's subscription (timed out)
        self.closed = asyncio.Event()
        self.present = asyncio.Event()  # the caller is in the room
        self.present.set()
        self.heard = asyncio.Event()  # the caller is subscribed to the agent track
        self._closing: asyncio.Task[None] | None = None
        self._grace: asyncio.Task[None] | None = None
        self._epoch = 0
        self._reader: asyncio.Task[None] | None = None
        self._reader_sid: str | None = None
        self._reader_track: rtc.Track | None = None
        self.tasks = TaskSet("livekit-call")
        self._handlers: list[tuple[str, Callable[..., None]]] = []

    @property
    def id(self) -> str:
        return self.session.id

    @classmethod
    async def start(cls, room: rtc.Room, caller: rtc.RemoteParticipant, link: BridgeLink, *,
                    options: CallOptions | None = None, pools: dict[str, str] | None = None,
                    sid: str | None = None, on_end: Callable[[str], Any] | None = None,
                    events: RoomEvents | None = None) -> LiveKitCall:
        """Open the session, publish the agent track, start media and data.

        Raises what Bridge.open_session raises (TooManySessions, Overloaded, ValueError for a bad
        pool). `on_end(reason)` is called once when the call ends by itself (caller left, room
        gone). `events`: the room's events recorded since the job connected (made here if None).
        """
        events = events or RoomEvents(room)
        try:
            options = options or CallOptions()
            sink = LiveKitSink(asyncio.get_running_loop())
            session = await link.run(link.bridge.open_session(
                sid or session_id_for(room.name), pools=pools, sink=sink, transport="livekit",
                out_rate=options.out_rate))
            try:
                call = cls(room, caller, link, session, sink, options, on_end)
            except BaseException:
                await link.run(link.bridge.close_session(session.id))
                raise
            try:
                publication = await room.local_participant.publish_track(
                    call.track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            except BaseException:
                await call.aclose("agent track not published")
                raise
        except BaseException:
            events.detach()
            raise
        link.post(setattr, session, "hangup", call._hangup)
        call._bind(events, publication)
        sink.send_control({"type": "session", "session": session.id, "ts": time.time()})
        log.info("call %s: caller %s in room %s", call.id, call.caller_identity, room.name)
        return call

    def _bind(self, events: RoomEvents, publication: rtc.LocalTrackPublication) -> None:
        handlers = self._event_handlers()
        for name in ROOM_EVENTS:
            self.room.on(name, handlers[name])  # type: ignore[arg-type]
            self._handlers.append((name, handlers[name]))
        backlog = events.detach()
        self._spawn(self.sink.run(self.room.local_participant), "sink")
        self._spawn(self._await_subscription(publication), "subscription")
        self._spawn(self._playout(), "playout")
        self._adopt_subscribed_track()
        for name, args in backlog:
            if self._closing is None:
                handlers[name](*args)
        if self._closing is None and self.present.is_set() and self.caller_identity not in self.room.remote_participants:
            self._caller_away(rtc.DisconnectReason.UNKNOWN_REASON)  # left before anything was recorded

    def _event_handlers(self) -> dict[str, Callable[..., None]]:
        return {"track_subscribed": self._on_track_subscribed, "track_unsubscribed": self._on_track_unsubscribed,
                "data_received": self._on_data, "participant_connected": self._on_participant_connected,
                "participant_disconnected": self._on_participant_disconnected,
                "local_track_subscribed": self._on_local_track_subscribed, "reconnecting": self._on_reconnecting,
                "reconnected": self._on_reconnected, "disconnected": self._on_disconnected}

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self.tasks.spawn(coro, f"{name}-{self.id}")

    # ------------------------------------------------------------ caller audio
    def _adopt_subscribed_track(self) -> None:
        """Read an audio track of the caller that was subscribed before we listened for it
        (on a real server the usual case: the caller published before the agent joined)."""
        for pub in list(self.caller.track_publications.values()):
            if pub.kind == rtc.TrackKind.KIND_AUDIO and pub.track is not None:
                self._on_track_subscribed(pub.track, pub, self.caller)
                return

    def _on_track_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                             participant: rtc.RemoteParticipant) -> None:
        if participant.identity != self.caller_identity or track.kind != rtc.TrackKind.KIND_AUDIO:
            return
        if self._reader is not None and not self._reader.done():
            if publication.sid != self._reader_sid:
                log.info("call %s: caller has a second audio track %s; still reading %s", self.id,
                         publication.sid, self._reader_sid)
                return
            if track is self._reader_track:
                return  # already reading it (an event replayed after the track was adopted)
            self._reader.cancel()  # the same publication resubscribed: read the new track
        self._reader_sid, self._reader_track = publication.sid, track
        self._reader = self._spawn(self._read_caller(track), "caller-audio")

    def _on_track_unsubscribed(self, track: rtc.Track | None, publication: rtc.RemoteTrackPublication,
                               participant: rtc.RemoteParticipant) -> None:
        # `track` may be None: the SDK clears a publication's track before it emits this
        if participant.identity != self.caller_identity or publication.sid != self._reader_sid:
            return
        self._stop_reader()
        self._adopt_subscribed_track()

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._reader, self._reader_sid, self._reader_track = None, None, None

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
    async def _await_subscription(self, publication: rtc.LocalTrackPublication) -> None:
        await publication.wait_for_subscription()
        self.heard.set()

    def _on_local_track_subscribed(self, track: rtc.Track) -> None:
        self.heard.set()  # the agent publishes one track: this one

    async def _until_heard(self, timeout_s: float) -> None:
        """Bounded: a caller whose client never subscribes still gets the call, only later."""
        if self.heard.is_set():
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.heard.wait()
        except TimeoutError:
            self.unheard_starts += 1
            log.info("call %s: no subscription to the agent's audio within %.1f s; playing anyway", self.id, timeout_s)

    async def _playout(self) -> None:
        n = self.samples_per_frame
        rate = self.options.out_rate
        silence = rtc.AudioFrame(bytes(2 * n), rate, 1, n)
        await self._until_heard(self.options.subscribe_timeout_s)
        while True:
            if not self.present.is_set():  # the caller dropped: keep the reply for when they are back
                await self.present.wait()
                # LiveKit may tell a publisher of its first subscriber only: wait less this time
                await self._until_heard(min(RESUME_SUBSCRIBE_S, self.options.subscribe_timeout_s))
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

    # ------------------------------------------------------------ data
    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic != CONTROL_TOPIC:
            return  # other topics belong to other room features
        sender = packet.participant
        if sender is None or sender.identity != self.caller_identity:
            self.control.reject("not_caller")
            return
        self.control.handle(packet.data)

    # ------------------------------------------------------------ presence and lifecycle
    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity != self.caller_identity:
            return
        if participant is not self.caller and participant.sid != self.caller.sid:
            return  # an older connection of the caller, replaced already (duplicate identity)
        reason = participant.disconnect_reason
        if reason in FINAL_REASONS:
            self._end(f"caller left ({reason_name(reason)})")
            return
        self._caller_away(reason)

    def _caller_away(self, reason: Any) -> None:
        if not self.present.is_set():
            return
        self.present.clear()
        self.heard.clear()
        self._stop_reader()
        log.info("call %s: caller %s dropped (%s); waiting %.0f s for them to come back", self.id,
                 self.caller_identity, reason_name(reason), self.options.reconnect_grace_s)
        self._grace = self._spawn(self._grace_period(), "reconnect-grace")

    async def _grace_period(self) -> None:
        await asyncio.sleep(self.options.reconnect_grace_s)
        self._end(f"caller did not come back within {self.options.reconnect_grace_s:g} s")

    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity != self.caller_identity or participant is self.caller:
            return
        was_away = not self.present.is_set()
        self.caller = participant  # the same identity on a new connection
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._stop_reader()
        self.heard.clear()
        self.present.set()
        self._adopt_subscribed_track()
        if was_away:
            self.reconnects += 1
            log.info("call %s: caller %s is back", self.id, self.caller_identity)
        self.sink.send_control({"type": "session", "session": self.id, "ts": time.time(), "resumed": True})

    def _on_reconnecting(self) -> None:
        log.info("call %s: the agent's connection to LiveKit is resuming", self.id)
        self.sink.hold()

    def _on_reconnected(self) -> None:
        log.info("call %s: the agent's connection to LiveKit is back", self.id)
        self.sink.resume()
        if self.present.is_set():
            self._adopt_subscribed_track()

    def _on_disconnected(self, reason: Any = None) -> None:
        self._end(f"room disconnected ({reason_name(reason)})")

    async def _hangup(self, reason: str) -> None:
        """session.hangup, called on the BRIDGE loop when a limit ends the call."""
        try:
            done = asyncio.run_coroutine_threadsafe(self._hang_up(reason), self.loop)
            await asyncio.wait_for(asyncio.wrap_future(done), CLOSE_TIMEOUT_S)
        except Exception as exc:  # the job's loop is gone: the call is over anyway
            log.debug("call %s: hangup: %r", self.id, exc)

    async def _hang_up(self, reason: str) -> None:
        await self.sink.flush(HANGUP_FLUSH_S)  # the bridge's `ended` message, before the job leaves
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self._closing is not None:
            return
        self._closing = self.loop.create_task(self._close(reason))
        if self.on_end is not None:
            try:
                self.on_end(reason)
            except Exception:
                log.exception("call %s: on_end failed", self.id)

    async def aclose(self, reason: str = "closed") -> None:
        """Stop media and data, close the session on the bridge. Idempotent."""
        if self._closing is None:
            self._closing = self.loop.create_task(self._close(reason))
        await asyncio.shield(self._closing)

    async def _close(self, reason: str) -> None:
        for event, handler in self._handlers:
            self.room.off(event, handler)  # type: ignore[arg-type]
        await self.tasks.aclose()  # cancels each task until it ends: one cancel can be swallowed
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
                "interrupts": self.interrupts, "reconnects": self.reconnects, "unheard_starts": self.unheard_starts,
                "control_rejected": dict(self.control.rejected), "sent": dict(self.sink.sent),
                "sink_dropped": dict(self.sink.dropped)}
