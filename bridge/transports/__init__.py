"""Transports: how callers reach a bridge. The interface and the registry (one line per transport).

A transport opens CallSessions on its Bridge, pushes caller audio into them,
pulls agent frames out at real-time pace and carries tokens and control
messages (the session's ClientSink). Modules are imported only when used, so
a bridge without WebRTC never imports aiortc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from shared.plugins import load_engine

if TYPE_CHECKING:
    from ..core import Bridge

TRANSPORTS: dict[str, str] = {
    "webrtc": "bridge.transports.webrtc:WebRtcTransport",
    "livekit": "bridge.transports.livekit_agent:LiveKitTransport",
}


class Transport(Protocol):
    name: str

    async def start(self) -> None:
        """Start accepting callers (listen, connect to a room server, ...)."""

    async def aclose(self) -> None:
        """Hang up every call (closing their sessions) and stop accepting new ones."""


def create(name: str, bridge: Bridge, **options: Any) -> Transport:
    engine: Transport = load_engine(TRANSPORTS, "transport", name, {"bridge": bridge, **options})
    return engine
