"""What a LiveKit call needs to know of its room: its options, the room events it listens to
(recorded from before the call starts, see `RoomEvents`), and which disconnects are final."""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass
from typing import Any

from livekit import rtc

# The caller's disconnect reasons that end the call (livekit-agents' DEFAULT_CLOSE_ON_DISCONNECT_REASONS).
FINAL_REASONS = frozenset({rtc.DisconnectReason.CLIENT_INITIATED, rtc.DisconnectReason.ROOM_DELETED,
                           rtc.DisconnectReason.USER_REJECTED})
MAX_EARLY_EVENTS = 1000  # room events kept while a call is starting (data packets past this are dropped)
ROOM_EVENTS = ("track_subscribed", "track_unsubscribed", "data_received", "participant_connected",
               "participant_disconnected", "local_track_subscribed", "reconnecting", "reconnected", "disconnected")


@dataclass(frozen=True)
class CallOptions:
    out_rate: int = 48_000  # agent track rate: Opus' native rate, no resampling in the SDK
    queue_ms: int = 200  # agent audio buffered in the AudioSource ahead of the network (RoomIO's value)
    track_name: str = "voxbus-agent"
    reconnect_grace_s: float = 20.0  # how long a caller who dropped (not hung up) may take to come back
    subscribe_timeout_s: float = 3.0  # how long the first agent audio waits for the caller's subscription


def session_id_for(room_name: str) -> str:
    """A session id that names its room (readable in Redis) and stays unique per call."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", room_name).strip("-")[:40] or "room"
    return f"lk-{stem}-{uuid.uuid4().hex[:8]}"


def reason_name(reason: Any) -> str:
    try:
        return str(rtc.DisconnectReason.Name(reason))
    except (ValueError, TypeError):
        return str(reason)


class RoomEvents:
    """The room's events from the moment this is made until `detach()`: made before a call
    starts, replayed into it once it has bound its own handlers."""

    def __init__(self, room: rtc.Room) -> None:
        self.room = room
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self._handlers = [(name, functools.partial(self._record, name)) for name in ROOM_EVENTS]
        for name, handler in self._handlers:
            room.on(name, handler)  # type: ignore[arg-type]

    def _record(self, name: str, *args: Any) -> None:
        if name == "data_received" and len(self.events) >= MAX_EARLY_EVENTS:
            return  # a long wait for the caller in a chatty room: the caller's own packets come later
        self.events.append((name, args))

    def detach(self) -> list[tuple[str, tuple[Any, ...]]]:
        for name, handler in self._handlers:
            self.room.off(name, handler)  # type: ignore[arg-type]
        self._handlers = []
        return self.events
