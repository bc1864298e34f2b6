"""LiveKit transport: the bridge as a LiveKit Agents worker.

The worker registers with a LiveKit server (LIVEKIT_URL, LIVEKIT_API_KEY,
LIVEKIT_API_SECRET) and gets one job per room. Each job connects to its room
(audio only), waits for the caller and serves the call with `livekit_io` on the
one Bridge of this process: jobs run in threads (JobExecutorType.THREAD), not
processes, because the bridge batches every call's ingest and VAD in one tick.
The worker reports load as sessions / `bridge.max_sessions`, so LiveKit stops
dispatching to a full bridge.

A job's `metadata` (set by whoever dispatches the agent, a trusted backend) may
be a JSON object `{"pools": {"asr": "...", "llm": "...", "tts": "..."}}` to
pick the call's pools.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from livekit import api
from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobExecutorType, JobRequest, WorkerOptions

from shared import metrics
from shared.config import Config, ConfigError

from ..core import Bridge, TooManySessions
from .livekit_io import CONTROL_TOPIC, BridgeLink, CallOptions, LiveKitCall

log = logging.getLogger("voxbus.livekit")

ENV_URL, ENV_KEY, ENV_SECRET, ENV_AGENT = "LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "LIVEKIT_AGENT_NAME"
DEFAULT_HEALTH_PORT = 8081


@dataclass(frozen=True)
class LiveKitSettings:
    url: str
    api_key: str
    api_secret: str = field(repr=False)
    agent_name: str = ""  # non-empty: explicit dispatch only (rooms must ask for this agent)

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
        return cls(url, values[ENV_KEY], values[ENV_SECRET], env.get(ENV_AGENT, "").strip())


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


async def serve_job(ctx: JobContext, link: BridgeLink, options: CallOptions) -> None:
    """A job's entrypoint: join the room, wait for the caller, start the call and return.

    The job lives on after the entrypoint returns; the call ends it (ctx.shutdown)
    when the caller leaves, and the job's shutdown closes the call.
    """
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    caller = await ctx.wait_for_participant()
    try:
        pools = pools_from_metadata(ctx.job.metadata)
        call = await LiveKitCall.start(ctx.room, caller, link, options=options, pools=pools, on_end=ctx.shutdown)
    except (TooManySessions, ValueError) as exc:
        reason = "too_many_sessions" if isinstance(exc, TooManySessions) else "bad_request"
        log.warning("room %s: call refused: %s", ctx.room.name, exc)
        try:
            await ctx.room.local_participant.publish_data(
                orjson.dumps({"type": "error", "reason": reason, "message": str(exc)}), reliable=True,
                topic=CONTROL_TOPIC)
        finally:
            ctx.shutdown(f"call refused: {reason}")
        return
    ctx.add_shutdown_callback(call.aclose)


def build_worker_options(bridge: Bridge, settings: LiveKitSettings, *, options: CallOptions | None = None,
                         port: int = DEFAULT_HEALTH_PORT) -> WorkerOptions:
    """WorkerOptions whose jobs serve calls on `bridge`. Call it on the bridge's event loop:
    the worker must run on that loop too (request and load callbacks read the bridge)."""
    link = BridgeLink(bridge, asyncio.get_running_loop())
    call_options = options or CallOptions()
    max_sessions = max(1, bridge.config.bridge.max_sessions)

    async def entrypoint(ctx: JobContext) -> None:
        await serve_job(ctx, link, call_options)

    async def on_request(request: JobRequest) -> None:
        if len(bridge.sessions) >= max_sessions:
            metrics.SESSIONS_REJECTED.labels("max_sessions").inc()
            await request.reject(terminate=False)  # LiveKit may offer the room to another bridge
            return
        await request.accept(name="voxbus")

    def load() -> float:
        return min(1.0, len(bridge.sessions) / max_sessions)

    return WorkerOptions(
        entrypoint_fnc=entrypoint, request_fnc=on_request, load_fnc=load, load_threshold=1.0,
        job_executor_type=JobExecutorType.THREAD, ws_url=settings.url, api_key=settings.api_key,
        api_secret=settings.api_secret, agent_name=settings.agent_name, port=port)


class LiveKitTransport:
    """The LiveKit Agents worker of one bridge: `start`, `wait` (until it stops), `stop`."""

    name = "livekit"

    def __init__(self, bridge: Bridge, *, settings: LiveKitSettings | None = None, out_rate: int = 48_000,
                 port: int | None = None, register: bool = True) -> None:
        self.bridge = bridge
        self.settings = settings or LiveKitSettings.from_env()
        self.options = CallOptions(out_rate=out_rate)
        self.port = DEFAULT_HEALTH_PORT if port is None else port
        self.register = register  # False: run without a LiveKit server (jobs only via simulate_job)
        self.server: AgentServer | None = None
        self._run: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker; raises if it fails before it is up (bad options, port in use)."""
        opts = build_worker_options(self.bridge, self.settings, options=self.options, port=self.port)
        server = self.server = AgentServer.from_server_options(opts)
        started = asyncio.Event()
        server.on("worker_started", started.set)
        self._run = asyncio.create_task(server.run(devmode=False, unregistered=not self.register),
                                        name="livekit-worker")
        up = asyncio.create_task(started.wait())
        await asyncio.wait({self._run, up}, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        if self._run.done():
            self._run.result()
            raise RuntimeError("the LiveKit worker stopped while starting")
        log.info("LiveKit worker started for %s (agent name %r)", self.settings.url, self.settings.agent_name)

    async def wait(self) -> None:
        """Until the worker stops; raises its error (e.g. LiveKit unreachable after retries)."""
        if self._run is not None:
            await self._run

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.aclose()  # ends every job; each job's shutdown closes its call
        if self._run is not None:
            await asyncio.gather(self._run, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        jobs = self.server.active_jobs if self.server is not None and self._run is not None else []
        return {"transport": self.name, "url": self.settings.url, "active_jobs": len(jobs),
                "sessions": len(self.bridge.sessions)}


async def run_livekit_worker(config: Config, redis_url: str, *, settings: LiveKitSettings | None = None,
                             out_rate: int = 48_000, port: int | None = None, vad_engine: Any | None = None) -> None:
    """Run a bridge served by the LiveKit worker until cancelled or the worker fails."""
    settings = settings or LiveKitSettings.from_env()  # fail on missing settings before anything starts
    bridge = Bridge(redis_url, config, vad_engine=vad_engine)
    await bridge.start()
    transport = LiveKitTransport(bridge, settings=settings, out_rate=out_rate, port=port)
    try:
        await transport.start()
        await transport.wait()
    finally:
        await transport.aclose()
        await bridge.aclose()
