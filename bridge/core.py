"""The bridge process core: its sessions, the ingest tick and the stream reader.

Caller frames are published as they arrive (CallSession.push_audio; the
publisher coalesces all sessions' frames of one loop turn into one round
trip). Every 20 ms one tick runs VAD over all sessions' new frames in one
batched inference (in a thread). One reader task follows every session's events,
tokens and audio.out streams through one multiplexed XREAD and hands each
message to its session. Transports (WebRTC, LiveKit) only open sessions, push
caller audio and pull agent frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from shared import metrics, tracing
from shared.admin.archive import open_archive
from shared.admin.archiving import Archiver, heartbeat_loop
from shared.bus import BatchPublisher, StreamMux, session_of
from shared.config import BridgeConfig, Config, archive_url_of
from shared.logs import RateLimitedLog
from shared.memory import release_free_memory
from shared.protocol import ChatMessage, Keys, SessionMeta, encode, validate_session_id
from shared.redis_conn import connect, wait_ready
from shared.routing import Router
from shared.tasks import TaskSet

from .context import SessionContext
from .session import CallSession, ClientSink
from .vad import create as create_vad
from .vad.segmenter import BatchVad, EndpointConfig

log = logging.getLogger("voxbus.bridge")
_limited = RateLimitedLog(log)

TICK_S = 0.02
VAD_DELIVERY_BATCH = 32  # sessions whose VAD events are handled concurrently in a tick
SESSION_TTL_S = 24 * 3600
# A session id stays claimed far longer than anything of its session is kept, so it is never reused.
CLAIM_TTL_S = 30 * 24 * 3600
# The recent-sessions index forgets a session once nothing of it can be left (its longest call, then its TTL).
SESSIONS_INDEX_S = 4 * 3600 + SESSION_TTL_S
ARCHIVE_DRAIN_S = 15.0  # a clean shutdown waits this long for the calls it is archiving


class TooManySessions(RuntimeError):
    pass


class Overloaded(RuntimeError):
    """A default pool is too far behind to take another call now (retry in a few seconds)."""


class SessionExists(ValueError):
    """The session id is live or was used before: ids are never reused (a reused id would hand the
    new caller the old call's recording, transcript and context)."""


def endpoint_config(b: BridgeConfig) -> EndpointConfig:
    """The VAD's settings: with an end-of-turn model, silence ends a turn only after max_endpoint_ms."""
    silence = b.max_endpoint_ms if b.eot != "none" else b.min_silence_ms
    return EndpointConfig(
        threshold=b.vad_threshold, min_speech_ms=b.min_speech_ms, min_silence_ms=silence,
        speech_pad_ms=b.speech_pad_ms, max_speech_ms=b.max_utterance_ms,
        pause_ms=b.preemptive_pause_ms if 0 < b.preemptive_pause_ms < silence else None)


class Bridge:
    def __init__(self, redis_url: str, config: Config, *, vad_engine: Any | None = None) -> None:
        self.redis_url = redis_url
        self.config = config
        tracing.setup("voxbus-bridge")  # off unless OTEL_EXPORTER_OTLP_ENDPOINT is set
        self.sessions: dict[str, CallSession] = {}
        self._vad_engine = vad_engine
        self.tasks = TaskSet("bridge")  # the ingest and reader loops are vital; side effects are not
        # VAD state is touched by the tick's thread: sessions join and leave it between ticks
        self._vad_changes: list[tuple[str, bool]] = []
        self._opening: set[str] = set()  # ids between the limit check and the session's creation
        self.id = f"bridge-{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started = asyncio.Event()
        # Called after every ingest tick with (its start on time.perf_counter(), its duration in s):
        # a public hook for measurements (ops/bench/capacity.py), nothing in the bridge needs it.
        self.tick_observers: list[Callable[[float, float], None]] = []
        self._next_limits_check = 0.0
        self._next_trim = time.time() + 60.0
        self.archiver: Archiver | None = None  # with an archive: each call ends up there (shared/admin/archiving.py)

    @property
    def bridge_config(self) -> BridgeConfig:
        return self.config.bridge

    async def start(self) -> None:
        self.redis = connect(self.redis_url)
        await wait_ready(self.redis, 30, self.redis_url)
        self.publisher = BatchPublisher(self.redis)
        self.router = Router(self.redis, self.config)
        self.mux = StreamMux(self.redis, block_ms=20)
        engine = self._vad_engine or create_vad("silero", {})
        self.vad = BatchVad(engine, endpoint_config(self.config.bridge))
        self.tasks.spawn(self._ingest_loop(), "ingest", vital=True)
        self.tasks.spawn(self._reader_loop(), "reader", vital=True)
        self.tasks.spawn(heartbeat_loop(self.redis, self.id), "heartbeat", vital=True)
        if url := archive_url_of(self.config.bridge):
            self.archiver = Archiver(self.redis, open_archive(url), retention_s=self.config.bridge.retention_s,
                                     who=self.id, tasks=self.tasks)
            self.tasks.spawn(self.archiver.sweep_loop(), "archive-sweep", vital=True)
        self.started.set()

    async def aclose(self) -> None:
        for sid in list(self.sessions):
            await self.close_session(sid)
        if self.archiver is not None:
            await self.archiver.drain(ARCHIVE_DRAIN_S)  # what is left, another bridge's sweep archives
        await self.tasks.aclose()
        with contextlib.suppress(Exception):  # gone or not, the heartbeat expires by itself
            await self.redis.delete(Keys.bridge(self.id))
        await self.mux.aclose()
        await self.publisher.aclose()
        await self.redis.aclose()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a Redis side effect without blocking the caller; failures are logged (rate-limited)."""
        self.tasks.spawn(self._quietly(coro), "io")

    async def _quietly(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as exc:
            _limited.warning(f"io:{type(exc).__name__}", "bridge background operation failed: %s: %s",
                             type(exc).__name__, exc)

    async def open_session(self, sid: str | None = None, *, pools: dict[str, str] | None = None,
                           sink: ClientSink | None = None, transport: str = "webrtc", out_rate: int = 48_000) -> CallSession:
        if len(self.sessions) + len(self._opening) >= self.config.bridge.max_sessions:
            metrics.SESSIONS_REJECTED.labels("max_sessions").inc()
            raise TooManySessions(f"bridge is at its limit of {self.config.bridge.max_sessions} sessions")
        sid = validate_session_id(sid or uuid.uuid4().hex[:16])
        if sid in self.sessions or sid in self._opening:
            raise SessionExists(f"session {sid} already exists")
        if (behind := await self.router.overloaded(self.config.bridge.admission_max_wait_ms)) is not None:
            metrics.SESSIONS_REJECTED.labels("overloaded").inc()
            raise Overloaded(f"the agent is overloaded: {behind}; try again in a few seconds")
        for stage, pool in (pools or {}).items():
            if self.config.pool(pool).stage != stage:
                raise ValueError(f"pool {pool!r} does not serve stage {stage!r}")
        meta = SessionMeta(session=sid, transport=transport, pools=pools or {})
        system = ChatMessage(session=sid, role="system", text=self.config.bridge.system_prompt)
        b = self.config.bridge
        context = SessionContext(self.redis, sid, meta=encode(meta), system=encode(system), ttl_s=SESSION_TTL_S,
                                 max_messages=b.context_max_messages, max_chars=b.context_max_chars)
        session = CallSession(self, sid, context, pools=pools, sink=sink, out_rate=out_rate, transport=transport)
        self._opening.add(sid)
        try:
            # The claim is atomic across bridges: of two callers opening one id, one gets it.
            if not await self.redis.set(Keys.claim(sid), self.id, nx=True, ex=CLAIM_TTL_S):
                metrics.SESSIONS_REJECTED.labels("id_taken").inc()
                raise SessionExists(f"session id {sid} was used before; session ids are never reused")
            pipe = self.redis.pipeline(transaction=False)
            # Anything left under a newly claimed id is older than any claim: not this call's.
            pipe.delete(*Keys.session_streams(sid), Keys.cancelled_turn(sid))
            context.open_into(pipe)
            pipe.zadd(Keys.SESSIONS, {sid: time.time()})
            pipe.zremrangebyscore(Keys.SESSIONS, "-inf", time.time() - SESSIONS_INDEX_S)
            if self.archiver is not None:
                pipe.zadd(Keys.ARCHIVE_PENDING, {sid: time.time()})
            await pipe.execute()
            for key in (Keys.events(sid), Keys.tokens(sid), Keys.audio_out(sid)):
                await self.mux.add(key, "0-0")
        finally:
            self._opening.discard(sid)
        self._vad_changes.append((sid, True))
        self.sessions[sid] = session
        metrics.ACTIVE_SESSIONS.set(len(self.sessions))
        log.info("session %s opened (%s)", sid, transport)
        return session

    async def close_session(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        session.closed = True
        session.trace.close()
        self._vad_changes.append((sid, False))
        for key in (Keys.events(sid), Keys.tokens(sid), Keys.audio_out(sid)):
            self.mux.remove(key)
        pipe = self.redis.pipeline(transaction=False)
        for key in [*Keys.session_streams(sid), Keys.ctx(sid)]:
            pipe.expire(key, SESSION_TTL_S)
        pipe.expire(Keys.claim(sid), CLAIM_TTL_S)
        pipe.set(Keys.ended(sid), f"{time.time():.3f}", ex=SESSION_TTL_S)
        await pipe.execute()
        metrics.ACTIVE_SESSIONS.set(len(self.sessions))
        log.info("session %s closed", sid)
        if self.archiver is not None:
            self.archiver.schedule(sid)  # keys keep SESSION_TTL_S until it is archived, then retention_s

    async def _ingest_loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            next_tick += TICK_S
            t0 = time.perf_counter()
            try:
                await self._tick()
            except Exception:
                _limited.exception("tick", "ingest tick failed")
            took = time.perf_counter() - t0
            metrics.INGEST_TICK_MS.observe(took * 1000)
            for observe in self.tick_observers:
                observe(t0, took)
            delay = next_tick - time.monotonic()
            if delay < -1.0:  # far behind (e.g. suspended): skip ahead instead of bursting
                next_tick = time.monotonic()
            await asyncio.sleep(max(0.0, delay))

    async def _tick(self) -> None:
        changes, self._vad_changes = self._vad_changes, []
        for sid, joined in changes:
            if joined:
                self.vad.add(sid)
            elif sid in self.vad:
                self.vad.remove(sid)
        # Frames were already published by push_audio; here they only go to the VAD. Pushing
        # them happens in the thread too: per frame it is Python work the loop must not wait on.
        batch = [(sid, frames) for sid, session in self.sessions.items()
                 if sid in self.vad and (frames := session.take_frames())]
        if batch:
            events, rejected = await asyncio.to_thread(self.vad.feed, batch)
            for sid, seq, reason in rejected:  # one bad frame must not cost the other sessions their tick
                _limited.warning("vad-reject", "session %s: VAD rejected frame %d: %s", sid, seq, reason)
            # Each session's events in order, sessions concurrently: their job submissions
            # (each waits for the publisher's round trip) overlap instead of queueing.
            per_session: dict[str, list[Any]] = {}
            for sid, event in events:
                per_session.setdefault(sid, []).append(event)

            async def deliver(session: CallSession, session_events: list[Any]) -> None:
                for event in session_events:
                    await session.on_vad(event)

            sids = list(per_session)
            for i in range(0, len(sids), VAD_DELIVERY_BATCH):  # bounded: each may hold a Redis connection
                # looked up per chunk: a session can close while an earlier chunk awaits
                chunk = [(sid, session) for sid in sids[i : i + VAD_DELIVERY_BATCH]
                         if (session := self.sessions.get(sid)) is not None]
                results = await asyncio.gather(*(deliver(session, per_session[sid]) for sid, session in chunk),
                                               return_exceptions=True)
                for (sid, _), result in zip(chunk, results):
                    if isinstance(result, Exception):
                        _limited.warning("vad-events", "session %s: handling its VAD events failed: %r", sid, result)
        now = time.time()
        for session in list(self.sessions.values()):
            session.tick(now)
        if now >= self._next_limits_check:
            self._next_limits_check = now + 1.0
            self._check_limits(now)
        if now >= self._next_trim:
            self._next_trim = now + 60.0
            await asyncio.to_thread(release_free_memory)

    def _check_limits(self, now: float) -> None:
        """End calls past their maximum duration, or silent (no caller audio at all) too long."""
        b = self.config.bridge
        for session in list(self.sessions.values()):
            if session.closed or session.expiring:
                continue
            if now - session.started >= b.max_call_s:
                why, reason = "max_duration", f"the call reached its maximum duration ({b.max_call_s:g} s)"
            elif now - session.last_audio_at >= b.idle_timeout_s:
                why, reason = "idle", f"no audio from the caller for {b.idle_timeout_s:g} s"
            else:
                continue
            session.expiring = True
            self.spawn(self._end_call(session, why, reason))

    async def _end_call(self, session: CallSession, why: str, reason: str) -> None:
        metrics.CALLS_ENDED.labels(why).inc()
        log.info("session %s: ending the call: %s", session.id, reason)
        session.sink.send_control({"type": "ended", "reason": reason})
        if session.hangup is not None:
            await session.hangup(reason)
        await self.close_session(session.id)

    async def _reader_loop(self) -> None:
        while True:
            try:
                batch = await self.mux.read()
            except Exception:  # the reader serves every session: it must outlive any bug
                _limited.exception("reader", "bridge stream reader failed; retrying")
                await asyncio.sleep(0.05)
                continue
            for received in batch:
                session = self.sessions.get(session_of(received.key) or "")
                if session is None:
                    continue
                try:
                    await session.on_message(received.msg)
                except Exception:
                    _limited.exception(f"handle:{type(received.msg).__name__}", "session %s failed to handle %s",
                                       session.id, type(received.msg).__name__)
