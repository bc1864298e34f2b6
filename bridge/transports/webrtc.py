"""Direct WebRTC transport (aiortc): one RTCPeerConnection per call, signaled over HTTP.

A call is born from one POST /v1/offer (see `signaling`): the bridge opens a
CallSession, answers the offer, binds the caller's audio track and the two
client-created data channels (see `channels`), and sends agent audio on its
own track (see `tracks`). The session id belongs to the peer connection for
its whole life; the call ends, and the session closes, when the peer
disconnects, fails, or never connects within `connect_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel

from shared import metrics
from shared.config import BridgeConfig
from shared.tasks import TaskSet

from ..core import Bridge, Overloaded, SessionExists, TooManySessions
from ..session import CallSession
from . import rtc_setup
from .channels import ChannelSink, ControlChannel
from .http_guard import GuardedSite, OfferLimiter, runner_options
from .signaling import build_app
from .tracks import AgentAudioTrack, pump_caller_audio

log = logging.getLogger("voxbus.webrtc")

TOKEN_ENV = "VOXBUS_BRIDGE_TOKEN"
# TURN credentials are secrets: they may come from the environment instead of the pools file.
ICE_SERVERS_ENV = "VOXBUS_ICE_SERVERS"
DISCONNECT_GRACE_S = 5.0  # "disconnected" may recover (ICE restart, network blip); "failed"/"closed" do not


class RtcCall:
    """One caller: its peer connection, session, tracks and channels."""

    def __init__(self, transport: WebRtcTransport, pc: RTCPeerConnection, session: CallSession, sink: ChannelSink) -> None:
        self.transport = transport
        self.pc = pc
        self.session = session
        self.sink = sink
        cfg = transport.cfg
        self.control = ControlChannel(session.id, cfg.max_datachannel_bytes,
                                      on_interrupt=self._interrupt, reply=sink.send_control)
        self.agent_track = AgentAudioTrack(session, rate=transport.out_rate)
        self.connected = asyncio.Event()
        self.closed = False
        self.opened_at = time.time()
        self._tasks = TaskSet(f"call-{session.id}")
        self._audio_bound = False
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    @property
    def id(self) -> str:
        return self.session.id

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.spawn(coro, name)

    def _interrupt(self) -> None:
        if not self.session.closed:
            self.session.interrupt("client")

    def _on_track(self, track: MediaStreamTrack) -> None:
        receiver = next((t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track), None)
        if track.kind != "audio" or self._audio_bound:
            # decoded frames of a track nobody reads would pile up: stop them before the decoder
            if receiver is not None:
                receiver._enabled = False
            self.control.reject(f"extra_{track.kind}_track")
            return
        self._audio_bound = True
        if receiver is not None:
            rtc_setup.set_jitter_target(receiver, self.transport.cfg.jitter_target_ms)
        self._spawn(pump_caller_audio(track, self.session), "caller-audio")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if not self.sink.bind(channel):
            self.control.reject("unknown_channel")
            channel.close()
            return
        if channel is self.sink.control:
            channel.on("message", self.control.handle)
        else:  # nothing is expected from the client on llm_tokens
            channel.on("message", lambda _msg: self.control.reject("tokens_channel_input"))

    def _on_state(self) -> None:
        state = self.pc.connectionState
        log.debug("call %s: connection %s", self.id, state)
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed"):
            self._spawn(self.close(f"peer {state}"), "close")
        elif state == "disconnected":
            self._spawn(self._close_unless_recovered(), "grace")

    async def _close_unless_recovered(self) -> None:
        await asyncio.sleep(DISCONNECT_GRACE_S)
        if self.pc.connectionState in ("disconnected", "failed", "closed"):
            await self.close("peer disconnected")

    async def watch_connect(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout_s)
        except TimeoutError:
            await self.close(f"peer did not connect within {timeout_s:.0f} s")

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("call %s closed: %s", self.id, reason)
        self.transport.calls.pop(self.id, None)
        self.agent_track.stop()
        try:
            await self.transport.bridge.close_session(self.id)
        finally:
            await self.pc.close()
            self._tasks.cancel_others()

    def stats(self) -> dict[str, Any]:
        return {**self.session.stats(), "connection": self.pc.connectionState,
                "frames_out": self.agent_track.frames, "audio_frames_out": self.agent_track.audio_frames,
                "control_rejected": dict(self.control.rejected), "sink_dropped": dict(self.sink.dropped)}


class OfferError(Exception):
    """An offer the bridge refuses: HTTP status and a JSON-able body."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class WebRtcTransport:
    """Serves the signaling API and the page; owns every direct WebRTC call of one bridge."""

    name = "webrtc"

    def __init__(self, bridge: Bridge, config: BridgeConfig | None = None, *, token: str | None = None,
                 host: str | None = None, port: int | None = None, out_rate: int = 48_000,
                 connect_timeout_s: float | None = None, loopback_candidates: bool | None = None) -> None:
        cfg = self.cfg = config or bridge.config.bridge
        self.bridge = bridge
        self.token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
        self.host = host or cfg.host
        self.port = cfg.port if port is None else port
        self.out_rate = out_rate
        self.connect_timeout_s = cfg.connect_timeout_s if connect_timeout_s is None else connect_timeout_s
        self.ice_servers = rtc_setup.ice_servers(cfg.ice_servers + os.environ.get(ICE_SERVERS_ENV, "").split())
        self.calls: dict[str, RtcCall] = {}
        self.offer_limiter = OfferLimiter(cfg.offer_rate_per_s, cfg.offer_burst)
        self._open_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        # a bridge listening on loopback has local callers only: they need a loopback candidate
        self.loopback_candidates = self.host in ("127.0.0.1", "localhost", "::1") if loopback_candidates is None else loopback_candidates

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def page_url(self) -> str:
        """The caller page with the token filled in (give it only to people who may call)."""
        return f"{self.url}?token={quote(self.token, safe='')}"

    async def start(self) -> None:
        rtc_setup.enable_opus_fec()
        if self.loopback_candidates:
            rtc_setup.include_loopback_candidates()
        self._runner = web.AppRunner(build_app(self), **runner_options(self.cfg.http_header_timeout_s))
        await self._runner.setup()
        site = GuardedSite(self._runner, self.host, self.port, max_connections=self.cfg.http_max_connections)
        await site.start()
        self.port = site.port  # the real one, when 0 asked for any
        log.info("WebRTC transport listening on %s", self.url)

    async def aclose(self) -> None:
        await asyncio.gather(*(call.close("bridge stopping") for call in list(self.calls.values())),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def accept_offer(self, sdp: str, sid: str | None, pools: dict[str, str] | None) -> tuple[RtcCall, str]:
        """Open a session for `sdp`; returns the call and the answer SDP. Raises OfferError."""
        sink = ChannelSink()
        # one open at a time: Bridge.open_session checks its limit before an await
        async with self._open_lock:
            pending = sum(1 for call in self.calls.values() if not call.connected.is_set())
            if pending >= self.cfg.max_pending_calls:
                metrics.SESSIONS_REJECTED.labels("pending_calls").inc()
                raise OfferError(503, "too_many_pending", f"{pending} calls are still connecting; try again shortly")
            if sid is not None and sid in self.bridge.sessions:
                raise OfferError(409, "session_exists", f"session {sid} already exists")
            try:
                session = await self.bridge.open_session(sid, pools=pools, sink=sink, transport=self.name,
                                                         out_rate=self.out_rate)
            except TooManySessions as exc:
                raise OfferError(503, "too_many_sessions", str(exc)) from None
            except SessionExists as exc:
                raise OfferError(409, "session_exists", str(exc)) from None
            except Overloaded as exc:
                raise OfferError(503, "overloaded", str(exc)) from None
            except ValueError as exc:  # bad session id, unknown pool, pool of the wrong stage
                raise OfferError(400, "bad_request", str(exc)) from None
            except Exception as exc:  # Redis unreachable, ...: the caller may retry
                log.warning("cannot open a session: %r", exc)
                raise OfferError(503, "unavailable", f"the bridge cannot open a session now: {type(exc).__name__}") from None
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers)))
        call = RtcCall(self, pc, session, sink)
        self.calls[call.id] = call
        session.hangup = call.close
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if not call._audio_bound:
                raise OfferError(400, "no_audio", "the offer has no audio track to send the caller's voice")
            pc.addTrack(call.agent_track)  # reuses the offer's audio transceiver: sendrecv if the client offered it
            await pc.setLocalDescription(await pc.createAnswer())
        except OfferError:
            await call.close("offer refused")
            raise
        except Exception as exc:  # aiortc raises ValueError/InvalidStateError/... on SDP it cannot use
            await call.close("bad offer")
            metrics.SESSIONS_REJECTED.labels("bad_offer").inc()
            raise OfferError(400, "bad_offer", f"cannot answer this offer: {type(exc).__name__}: {exc}") from None
        sink.send_control({"type": "session", "session": call.id, "ts": time.time(),
                           "jitter_target_ms": self.cfg.jitter_target_ms})
        call._spawn(call.watch_connect(self.connect_timeout_s), "connect-timeout")
        return call, pc.localDescription.sdp
