"""LiveKit transport: the bridge as a LiveKit Agents worker.

The worker registers with a LiveKit server (LIVEKIT_URL, LIVEKIT_API_KEY,
LIVEKIT_API_SECRET) and gets one job per room. Each job connects to its room
(audio only), waits for the caller and serves the call with `livekit_io` on the
one Bridge of this process: jobs run in threads (JobExecutorType.THREAD), not
processes, because the bridge batches every call's ingest and VAD in one tick.

Load counts every job the worker has taken on (`JobSlots`), from the moment it
accepts one, through connecting and waiting for the caller, to the job's end,
so LiveKit sees the worker full (and routes rooms to another bridge) before a
caller could be refused. `aclose()` drains like the SDK's runner: the worker
stops taking jobs and live calls go on until they end or `drain_timeout_s`
passes, then the rest are hung up.

A job's `metadata` (set by whoever dispatches the agent, a trusted backend) may
be a JSON object `{"pools": {"asr": "...", "llm": "...", "tts": "..."}}` to
pick the call's pools.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from livekit import api, rtc
from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobExecutorType, JobRequest, WorkerOptions

from shared import metrics
from shared.config import ConfigError

from ..core import Bridge, Overloaded, SessionExists, TooManySessions
from .livekit_io import LiveKitCall
from .livekit_link import CONTROL_TOPIC, PUBLISH_TIMEOUT_S, BridgeLink
from .livekit_room import CallOptions, RoomEvents

log = logging.getLogger("voxbus.livekit")

ENV_URL, ENV_KEY, ENV_SECRET, ENV_AGENT = "LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "LIVEKIT_AGENT_NAME"
ENV_DRAIN, ENV_GRACE = "VOXBUS_LIVEKIT_DRAIN_TIMEOUT_S", "VOXBUS_LIVEKIT_RECONNECT_GRACE_S"
DEFAULT_HEALTH_PORT = 8081
DEFAULT_DRAIN_TIMEOUT_S = 600.0
DEFAULT_RECONNECT_GRACE_S = 20.0
RESERVATION_TTL_S = 30.0  # an accepted job that never started (assignment lost) frees its slot after this
REFUSAL_LINGER_S = 0.5  # publish_data returns once queued: the refusal gets this long to leave before we do


@dataclass(frozen=True)
class LiveKitSettings:
    url: str
    api_key: str
    api_secret: str = field(repr=False)
    agent_name: str = ""  # non-empty: explicit dispatch only (rooms must ask for this agent)
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S  # on stop, live calls get this long to end (0: none)
    reconnect_grace_s: float = DEFAULT_RECONNECT_GRACE_S  # a dropped caller gets this long to come back

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LiveKitSettings:
        env = os.environ if environ is None else environ
        values = {name: env.get(name, "").strip() for name in (ENV_URL, ENV_KEY, ENV_SECRET)}
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise ConfigError(
                f"the LiveKit transport needs {', '.join(missing)} in the environment "
                f"(the server's URL, e.g. wss://my-project.livekit.cloud, and an API key and secret)")
        url = values[ENV_URL]
        if not url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ConfigError(f"{ENV_URL}={url!r}: expected a ws://, wss://, http:// or https:// URL")
        return cls(url, values[ENV_KEY], values[ENV_SECRET], env.get(ENV_AGENT, "").strip(),
                   _seconds(env, ENV_DRAIN, DEFAULT_DRAIN_TIMEOUT_S), _seconds(env, ENV_GRACE, DEFAULT_RECONNECT_GRACE_S))


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not 0 <= value < 1e6:
        raise ConfigError(f"{name}={raw!r}: expected 0 or more seconds")
    return value


def caller_token(settings: LiveKitSettings, room: str, identity: str, *, name: str = "",
                 ttl: datetime.timedelta = datetime.timedelta(hours=1)) -> str:
    """A JWT that lets `identity` join `room`, publish its microphone and data, and subscribe.

    With `settings.agent_name` set (explicit dispatch), the token also asks LiveKit
    to dispatch that agent when the room is created.
    """
    token = (api.AccessToken(settings.api_key, settings.api_secret)
             .with_identity(identity).with_name(name or identity).with_ttl(ttl)
             .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                          can_publish_data=True)))
    if settings.agent_name:
        token = token.with_room_config(api.RoomConfiguration(
            agents=[api.RoomAgentDispatch(agent_name=settings.agent_name)]))
    return token.to_jwt()


def pools_from_metadata(metadata: str) -> dict[str, str] | None:
    """The `pools` of a job's metadata; None when there are none. Raises ValueError when malformed."""
    if not metadata.strip():
        return None
    try:
        data = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        raise ValueError("job metadata is not JSON") from None
    pools = data.get("pools") if isinstance(data, dict) else None
    if pools is None:
        return None
    if not isinstance(pools, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in pools.items()):
        raise ValueError("job metadata: `pools` must map stage names to pool names")
    return pools


class JobSlots:
    """The jobs this worker has taken on, by job id, from acceptance to the job's end.

    Thread-safe: requests are answered on the worker's loop, load is read in the
    SDK's executor, jobs start and end in their own threads.
    """

    def __init__(self, capacity: int, *, reservation_ttl_s: float = RESERVATION_TTL_S) -> None:
        self.capacity = max(1, capacity)
        self._ttl = reservation_ttl_s
        self._lock = threading.Lock()
        self._accepted: dict[str, float] = {}  # accepted, not started yet: when
        self._running: set[str] = set()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._accepted) + len(self._running)

    def reserve(self, job_id: str) -> bool:
        """Take a slot for a job about to be accepted; False when every slot is taken."""
        with self._lock:
            self._expire()
            if len(self._accepted) + len(self._running) >= self.capacity:
                return False
            self._accepted[job_id] = time.monotonic()
            return True

    def started(self, job_id: str) -> None:
        with self._lock:
            self._accepted.pop(job_id, None)
            self._running.add(job_id)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._accepted.pop(job_id, None)
            self._running.discard(job_id)

    def load(self, sessions: int = 0) -> float:
        """What the worker reports: taken slots (or open sessions, if more) over capacity."""
        return min(1.0, max(len(self), sessions) / self.capacity)

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id in [j for j, at in self._accepted.items() if now - at > self._ttl]:
            del self._accepted[job_id]


REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (TooManySessions, "too_many_sessions"), (Overloaded, "overloaded"), (SessionExists, "session_exists"),
    (ValueError, "bad_request"))


async def serve_job(ctx: JobContext, link: BridgeLink, options: CallOptions) -> None:
    """A job's entrypoint: join the room, wait for the caller, start the call and return.

    The job lives on after the entrypoint returns; the call ends it (ctx.shutdown)
    when the caller leaves, and the job's shutdown closes the call.
    """
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    events = RoomEvents(ctx.room)  # from here on nothing the room says is lost: the state so far is in the room
    try:
        caller = await ctx.wait_for_participant()
    except BaseException:
        events.detach()
        raise
    try:
        pools = pools_from_metadata(ctx.job.metadata)
        call = await LiveKitCall.start(ctx.room, caller, link, options=options, pools=pools, on_end=ctx.shutdown,
                                       events=events)
    except Exception as exc:
        reason = next((code for kind, code in REFUSALS if isinstance(exc, kind)), "unavailable")
        if reason == "unavailable":
            log.exception("room %s: cannot start the call of %s", ctx.room.name, caller.identity)
        await refuse(ctx, caller, reason, str(exc) if reason != "unavailable" else "the agent cannot take calls now")
        return
    ctx.add_shutdown_callback(call.aclose)


async def refuse(ctx: JobContext, caller: rtc.RemoteParticipant, reason: str, message: str) -> None:
    """Tell the caller why there is no call (an `error` on `control`), give it time to leave, end the job."""
    metrics.SESSIONS_REJECTED.labels(reason).inc()
    log.warning("room %s: call of %s refused (%s): %s", ctx.room.name, caller.identity, reason, message)
    payload = orjson.dumps({"type": "error", "reason": reason, "message": message})
    try:
        await asyncio.wait_for(ctx.room.local_participant.publish_data(
            payload, reliable=True, topic=CONTROL_TOPIC, destination_identities=[caller.identity]), PUBLISH_TIMEOUT_S)
        await asyncio.sleep(REFUSAL_LINGER_S)
    except Exception as exc:
        log.warning("room %s: could not tell %s the call was refused: %r", ctx.room.name, caller.identity, exc)
    finally:
        ctx.shutdown(f"call refused: {reason}")


def build_worker_options(bridge: Bridge, settings: LiveKitSettings, *, options: CallOptions | None = None,
                         port: int = DEFAULT_HEALTH_PORT, slots: JobSlots | None = None,
                         accepting: threading.Event | None = None) -> WorkerOptions:
    """WorkerOptions whose jobs serve calls on `bridge`. Call it on the bridge's event loop:
    the worker must run on that loop too (requests read the bridge). `accepting` cleared: refuse jobs."""
    link = BridgeLink(bridge, asyncio.get_running_loop())
    call_options = options or CallOptions(reconnect_grace_s=settings.reconnect_grace_s)
    job_slots = JobSlots(bridge.config.bridge.max_sessions) if slots is None else slots
    if accepting is None:
        accepting = threading.Event()
        accepting.set()

    async def entrypoint(ctx: JobContext) -> None:
        job_id = ctx.job.id
        job_slots.started(job_id)

        async def release() -> None:
            job_slots.release(job_id)

        ctx.add_shutdown_callback(release)
        await serve_job(ctx, link, call_options)

    async def on_request(request: JobRequest) -> None:
        if not accepting.is_set() or not job_slots.reserve(request.id):
            metrics.SESSIONS_REJECTED.labels("max_sessions" if accepting.is_set() else "draining").inc()
            await request.reject(terminate=False)  # LiveKit may offer the room to another bridge
            return
        try:
            await request.accept(name="voxbus")
        except BaseException:
            job_slots.release(request.id)
            raise

    def load() -> float:
        return job_slots.load(len(bridge.sessions))

    return WorkerOptions(
        entrypoint_fnc=entrypoint, request_fnc=on_request, load_fnc=load, load_threshold=1.0,
        job_executor_type=JobExecutorType.THREAD, ws_url=settings.url, api_key=settings.api_key,
        api_secret=settings.api_secret, agent_name=settings.agent_name, port=port,
        drain_timeout=max(1, round(settings.drain_timeout_s)))


class LiveKitTransport:
    """The LiveKit Agents worker of one bridge: `start`, `wait` (until it stops), `aclose` (drains first)."""

    name = "livekit"

    def __init__(self, bridge: Bridge, *, settings: LiveKitSettings | None = None, out_rate: int = 48_000,
                 port: int | None = None, register: bool = True, drain_timeout_s: float | None = None) -> None:
        self.bridge = bridge
        self.settings = settings or LiveKitSettings.from_env()
        self.options = CallOptions(out_rate=out_rate, reconnect_grace_s=self.settings.reconnect_grace_s)
        self.port = DEFAULT_HEALTH_PORT if port is None else port
        self.register = register  # False: run without a LiveKit server (jobs only via simulate_job)
        self.drain_timeout_s = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.slots = JobSlots(bridge.config.bridge.max_sessions)
        self.accepting = threading.Event()
        self.accepting.set()
        self.worker_options: WorkerOptions | None = None
        self.server: AgentServer | None = None
        self._run: asyncio.Task[None] | None = None
        self._draining: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker and return once LiveKit has registered it (unregistered: once it runs);
        raises if it stops before (bad options, port in use, LiveKit unreachable after retries)."""
        opts = self.worker_options = build_worker_options(self.bridge, self.settings, options=self.options,
                                                          port=self.port, slots=self.slots, accepting=self.accepting)
        server = self.server = AgentServer.from_server_options(opts)
        up = asyncio.Event()
        server.on("worker_registered" if self.register else "worker_started", lambda *_: up.set())
        self._run = asyncio.create_task(server.run(devmode=False, unregistered=not self.register),
                                        name="livekit-worker")
        if self.register:
            log.info("registering with LiveKit at %s (agent name %r)", self.settings.url, self.settings.agent_name)
        waiting = asyncio.create_task(up.wait(), name="livekit-worker-up")
        try:
            await asyncio.wait({self._run, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if self._run.done():
            self._run.result()
            raise RuntimeError("the LiveKit worker stopped while starting")
        log.info("LiveKit worker up for %s (agent name %r)", self.settings.url, self.settings.agent_name)

    async def wait(self) -> None:
        """Until the worker stops; raises its error (e.g. LiveKit unreachable after retries)."""
        if self._run is not None:
            await self._run

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking jobs (LiveKit sees the worker full) and wait up to `timeout_s` (default
        `drain_timeout_s`) for every job to end; True if they all did."""
        self.accepting.clear()
        timeout = self.drain_timeout_s if timeout_s is None else timeout_s
        if self.server is None or self._run is None or self._run.done() or timeout <= 0:
            return len(self.slots) == 0
        log.info("draining the LiveKit worker: %d jobs, up to %.0f s", len(self.server.active_jobs), timeout)
        self._draining = asyncio.create_task(self.server.drain(timeout=timeout),  # type: ignore[arg-type]
                                             name="livekit-drain")  # the SDK takes any number of seconds
        try:
            await self._draining
        except (TimeoutError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not self._draining.cancelled():
                raise  # our caller was cancelled, not the drain
            why = "timed out" if isinstance(exc, TimeoutError) else "cut short"
            log.warning("drain %s: hanging up %d calls", why, len(self.server.active_jobs))
            return False
        return True

    def hurry(self) -> None:
        """End a drain in progress now (a second SIGTERM/SIGINT): the calls left are hung up."""
        if self._draining is not None and not self._draining.done():
            self._draining.cancel()

    async def aclose(self) -> None:
        """Drain (see `drain`), then stop the worker: every job left ends and closes its call."""
        await self.drain()
        if self.server is not None:
            await self.server.aclose()
        if self._run is not None:
            await asyncio.gather(self._run, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        jobs = self.server.active_jobs if self.server is not None and self._run is not None else []
        return {"transport": self.name, "url": self.settings.url, "active_jobs": len(jobs), "slots": len(self.slots),
                "accepting": self.accepting.is_set(), "sessions": len(self.bridge.sessions)}
