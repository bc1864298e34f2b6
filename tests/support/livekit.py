"""A LiveKit room double, as strict as livekit rtc 1.1.21's `rtc.Room` where the transport depends on it.

No LiveKit server can run on the test machines, so the tests give the transport
this room instead of `rtc.Room` (directly, or as the room of a fake job of the
real AgentServer, see `rooms_for_fake_jobs`). It behaves as the real SDK does
(rtc/room.py, livekit-ffi's rtc_engine) where a forgiving double would not:

- `remote_participants` by identity, each with `sid`, `kind`, `state` and
  `disconnect_reason`; a participant may be in the room, its microphone already
  subscribed, before the agent connects (the usual path on a real server);
- joining emits participant_connected, then participant_active; a track
  arrives in track_subscribed only after `set_subscribed(True)` (or the room's
  auto-subscribe), one loop turn later;
- leaving emits track_unsubscribed (with track=None here: the SDK clears the
  publication's track and may hand out None), track_unpublished, then
  participant_disconnected with the reason set; a returning caller is a new
  participant object with a new sid;
- the room has a connection state, `reconnecting`/`reconnected` and
  `disconnected(reason)` events;
- `publish_data` waits while the room reconnects (and raises if it then
  disconnects), raises `PublishDataError` when disconnected or when the encoded
  packet is over the SDK's 64000-byte message limit, and can be made to fail or
  hang; reliable packets over LiveKit's documented 15 KiB limit are recorded in
  `oversize` (a real server may drop them);
- `publish_track` can fail; its publication's `wait_for_subscription()` waits
  for a remote participant to subscribe, and `local_track_subscribed` is
  emitted for the first subscriber only (the least a publisher may be told).

Media is real: tracks are `rtc.LocalAudioTrack`s that the transport reads with
`rtc.AudioStream`. A room belongs to one loop (the job's): `act()` runs one of
its methods there from any other loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import orjson
import pytest
from livekit import rtc
from livekit.rtc.participant import PublishDataError

T = TypeVar("T")

MAX_MESSAGE_SIZE = 64_000  # livekit-ffi: DEFAULT_MAX_MESSAGE_SIZE, the cap on an encoded data packet
PACKET_OVERHEAD = 48  # the DataPacket's protobuf framing besides payload, topic and identities
DOCUMENTED_LIMIT = 15 * 1024  # LiveKit docs: a reliable data packet may carry up to 15 KiB
SUBSCRIBE_DELAY_S = 0.05  # a remote participant's subscription to the agent's track takes a round trip

Reason = rtc.DisconnectReason


def new_sid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass(eq=False)
class RemotePublicationDouble:
    media: rtc.Track  # what the participant publishes; `track` once subscribed
    room: RoomDouble
    sid: str = field(default_factory=lambda: new_sid("TR"))
    kind: int = rtc.TrackKind.KIND_AUDIO
    source: int = rtc.TrackSource.SOURCE_MICROPHONE
    name: str = "microphone"
    subscribed: bool = False
    participant: RemoteParticipantDouble | None = None

    @property
    def track(self) -> rtc.Track | None:
        return self.media if self.subscribed else None

    def set_subscribed(self, subscribed: bool) -> None:
        """As the SDK: asks the server; the track comes later in track_subscribed."""
        if subscribed and not self.subscribed:
            self.room.loop_().call_soon(self.room._deliver, self)


@dataclass(eq=False)
class RemoteParticipantDouble:
    identity: str
    sid: str = field(default_factory=lambda: new_sid("PA"))
    kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
    state: int = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    disconnect_reason: int = Reason.UNKNOWN_REASON
    hears_agent: bool = True  # subscribes to the agent's track, as a client with auto-subscribe does
    name: str = ""
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    track_publications: dict[str, RemotePublicationDouble] = field(default_factory=dict)


class LocalPublicationDouble:
    def __init__(self, track: rtc.LocalTrack) -> None:
        self.track = track
        self.sid = new_sid("TR")
        self.subscribers: set[str] = set()
        self._first: asyncio.Future[None] | None = None

    def _first_subscription(self) -> asyncio.Future[None]:
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
        return self._first

    async def wait_for_subscription(self) -> None:
        await asyncio.shield(self._first_subscription())


class LocalParticipantDouble:
    def __init__(self, room: RoomDouble) -> None:
        self.room = room
        self.identity = "agent-test"
        self.sid = new_sid("PA")
        self.kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        self.packets: list[tuple[bytes, bool, str, list[str]]] = []
        self.oversize: list[tuple[int, str]] = []
        self.track_publications: dict[str, LocalPublicationDouble] = {}
        self.tracks: list[rtc.LocalTrack] = []
        self.fail_data = 0  # the next this many publish_data calls raise
        self.publish_track_error: Exception | None = None
        self.while_publishing_track: Callable[[], Any] | None = None  # runs while publish_track is in flight
        self._flowing = asyncio.Event()  # cleared: publish_data hangs (a full data channel)
        self._flowing.set()

    def hang_data(self, hang: bool = True) -> None:
        self._flowing.clear() if hang else self._flowing.set()

    async def publish_data(self, payload: bytes | str, *, reliable: bool = True,
                           destination_identities: list[str] | None = None, topic: str = "") -> None:
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        dest = list(destination_identities or [])
        await self.room._connected_or_raise()
        size = len(data) + len(topic.encode()) + sum(len(i.encode()) for i in dest) + len(self.identity) + PACKET_OVERHEAD
        if size > MAX_MESSAGE_SIZE:
            raise PublishDataError(f"data packet size ({size} bytes) exceeds the negotiated maximum message size "
                                   f"({MAX_MESSAGE_SIZE} bytes)")
        await self._flowing.wait()
        if self.fail_data > 0:
            self.fail_data -= 1
            raise PublishDataError("failed to send data: the data channel is closed")
        if reliable and len(data) > DOCUMENTED_LIMIT:
            self.oversize.append((len(data), topic))
        self.packets.append((data, reliable, topic, dest))

    async def publish_track(self, track: rtc.LocalTrack, options: Any = None) -> LocalPublicationDouble:
        await self.room._connected_or_raise()
        await asyncio.sleep(0.01)  # a server round trip
        if self.while_publishing_track is not None:
            self.while_publishing_track()
        if self.publish_track_error is not None:
            raise self.publish_track_error
        pub = LocalPublicationDouble(track)
        self.track_publications[pub.sid] = pub
        self.tracks.append(track)
        for p in list(self.room.remote_participants.values()):
            if p.hears_agent:
                self.room.loop_().call_later(SUBSCRIBE_DELAY_S, self.room.agent_track_subscribed, p.identity)
        return pub

    def on_topic(self, topic: str) -> list[tuple[dict[str, Any], bool]]:
        return [(orjson.loads(p), reliable) for p, reliable, t, _ in list(self.packets) if t == topic]


class RoomDouble(rtc.EventEmitter[str]):
    def __init__(self, name: str, *, connected: bool = False, auto_subscribe: bool = True) -> None:
        super().__init__()
        self._info = SimpleNamespace(name=name, sid=new_sid("RM"), metadata="")
        self.local_participant = LocalParticipantDouble(self)
        self.connection_state: int = (rtc.ConnectionState.CONN_CONNECTED if connected
                                      else rtc.ConnectionState.CONN_DISCONNECTED)
        self.auto_subscribe = auto_subscribe
        self.loop: asyncio.AbstractEventLoop | None = None
        self._remote: dict[str, RemoteParticipantDouble] = {}
        self._link_up = asyncio.Event()  # cleared while reconnecting
        self._link_up.set()
        self.connects = 0
        self.packets_when_disconnected: int | None = None  # how many data packets had left when the agent left

    # ---------------------------------------------------------------- what rtc.Room offers
    @property
    def name(self) -> str:
        return str(self._info.name)

    @property
    def remote_participants(self) -> dict[str, RemoteParticipantDouble]:
        return dict(self._remote)

    def isconnected(self) -> bool:
        return self.connection_state != rtc.ConnectionState.CONN_DISCONNECTED

    async def connect(self, url: str, token: str, options: rtc.RoomOptions | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.connects += 1
        if options is not None:
            self.auto_subscribe = options.auto_subscribe
        self._set_state(rtc.ConnectionState.CONN_CONNECTED)
        for p in self._remote.values():
            if p.hears_agent and self.local_participant.track_publications:
                self.loop.call_later(SUBSCRIBE_DELAY_S, self.agent_track_subscribed, p.identity)

    async def disconnect(self, *, reason: int = Reason.CLIENT_INITIATED) -> None:
        if self.isconnected():
            self._lost(reason)

    # ---------------------------------------------------------------- what a server and callers do
    def loop_(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            raise RuntimeError("the room has no loop yet: connect it, or set `loop` to the job's")
        return self.loop

    async def act(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the room's loop (the job's) from another loop; its result."""
        async def run() -> T:
            return fn(*args)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self.loop_()))

    def join(self, identity: str, mic: rtc.Track | None = None, *, subscribed: bool = False,
             hears_agent: bool = True) -> RemoteParticipantDouble:
        """A participant joins (a new object and sid each time), publishing `mic` if given.

        Before the agent connected: no events, and `subscribed` puts the track there already subscribed.
        """
        p = RemoteParticipantDouble(identity, hears_agent=hears_agent)
        if identity in self._remote:
            raise RuntimeError(f"participant {identity} already in the room")  # as the SDK
        pub = None
        if mic is not None:
            pub = RemotePublicationDouble(mic, self, participant=p, subscribed=subscribed and not self.isconnected())
            p.track_publications[pub.sid] = pub
        self._remote[identity] = p
        if not self.isconnected():
            return p
        p.state = rtc.ParticipantState.PARTICIPANT_STATE_JOINED
        self.emit("participant_connected", p)
        self.loop_().call_soon(self._activate, p, pub)
        for local in self.local_participant.track_publications.values():
            if hears_agent and not local.subscribers:
                self.loop_().call_later(SUBSCRIBE_DELAY_S, self.agent_track_subscribed, identity)
        return p

    def publish(self, identity: str, mic: rtc.Track) -> RemotePublicationDouble:
        """A participant in the room publishes another track (e.g. a new microphone)."""
        p = self._remote[identity]
        pub = RemotePublicationDouble(mic, self, participant=p)
        p.track_publications[pub.sid] = pub
        self.emit("track_published", pub, p)
        if self.auto_subscribe:
            pub.set_subscribed(True)
        return pub

    def _activate(self, p: RemoteParticipantDouble, pub: RemotePublicationDouble | None) -> None:
        if self._remote.get(p.identity) is not p:
            return
        p.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.emit("participant_active", p)
        if pub is not None:
            self.emit("track_published", pub, p)
            if self.auto_subscribe:
                pub.set_subscribed(True)

    def _deliver(self, pub: RemotePublicationDouble) -> None:
        p = pub.participant
        if pub.subscribed or p is None or self._remote.get(p.identity) is not p or not self.isconnected():
            return
        pub.subscribed = True
        self.emit("track_subscribed", pub.media, pub, p)

    def unsubscribe(self, identity: str, sid: str, *, track_none: bool = True) -> None:
        p = self._remote[identity]
        pub = p.track_publications[sid]
        track = None if track_none else pub.track
        pub.subscribed = False
        self.emit("track_unsubscribed", track, pub, p)

    def leave(self, identity: str, reason: int = Reason.CLIENT_INITIATED) -> RemoteParticipantDouble:
        p = self._remote[identity]
        for pub in list(p.track_publications.values()):
            if pub.subscribed:
                self.unsubscribe(identity, pub.sid)
            self.emit("track_unpublished", pub, p)
        del self._remote[identity]
        p.disconnect_reason = reason
        p.state = rtc.ParticipantState.PARTICIPANT_STATE_DISCONNECTED
        self.emit("participant_disconnected", p)
        return p

    def agent_track_subscribed(self, identity: str) -> None:
        """`identity` subscribes to the agent's track(s)."""
        if identity not in self._remote or not self.isconnected():
            return
        for pub in self.local_participant.track_publications.values():
            first = not pub.subscribers
            pub.subscribers.add(identity)
            if first:
                fut = pub._first_subscription()
                if not fut.done():
                    fut.set_result(None)
                self.emit("local_track_subscribed", pub.track)

    def send_data(self, sender: RemoteParticipantDouble | None, data: bytes, topic: str = "control") -> None:
        self.emit("data_received", rtc.DataPacket(data=data, kind=rtc.DataPacketKind.KIND_RELIABLE,
                                                  participant=sender, topic=topic))  # type: ignore[arg-type]

    def reconnecting(self) -> None:
        self._link_up.clear()
        self._set_state(rtc.ConnectionState.CONN_RECONNECTING)
        self.emit("reconnecting")

    def reconnected(self) -> None:
        self._set_state(rtc.ConnectionState.CONN_CONNECTED)
        self._link_up.set()
        self.emit("reconnected")

    def server_disconnect(self, reason: int = Reason.ROOM_DELETED) -> None:
        self._lost(reason)

    # ---------------------------------------------------------------- internals
    def _set_state(self, state: int) -> None:
        self.connection_state = state
        self.emit("connection_state_changed", state)

    def _lost(self, reason: int) -> None:
        self.packets_when_disconnected = len(self.local_participant.packets)
        self._set_state(rtc.ConnectionState.CONN_DISCONNECTED)
        self._link_up.set()  # wakes publishes waiting for a reconnection: they raise
        self.emit("disconnected", reason)

    async def _connected_or_raise(self) -> None:
        await self._link_up.wait()  # as the SDK: wait out a reconnection
        if not self.isconnected():
            raise PublishDataError("the room is disconnected")


def rooms_for_fake_jobs(monkeypatch: pytest.MonkeyPatch, make: Callable[[], RoomDouble]) -> list[RoomDouble]:
    """Fake jobs of the real AgentServer get a room from `make()` instead of the SDK's mock room;
    returns the list of rooms given out, in order."""
    from livekit.agents.ipc import mock_room

    rooms: list[RoomDouble] = []

    def create() -> RoomDouble:
        room = make()
        rooms.append(room)
        return room

    monkeypatch.setattr(mock_room, "create_mock_room", create)
    return rooms


def caller_mic(rate: int = 48_000) -> tuple[rtc.AudioSource, rtc.LocalAudioTrack]:
    """A caller's microphone: a real AudioSource and its track (make it on the loop that feeds it)."""
    source = rtc.AudioSource(rate, 1, queue_size_ms=100)
    return source, rtc.LocalAudioTrack.create_audio_track("mic", source)


def packets_on(room: RoomDouble, topic: str) -> Iterator[dict[str, Any]]:
    return (m for m, _ in room.local_participant.on_topic(topic))
