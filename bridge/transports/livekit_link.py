"""The two wires of a LiveKit call: the bridge loop <-> a job's loop, and data packets to the room.

livekit-agents runs every job in its own thread with its own event loop (the
THREAD executor, see `livekit_agent`), while the Bridge and its sessions live
on the bridge's loop. `BridgeLink` carries every touch of a session to the
bridge loop (in FIFO order); `LiveKitSink` carries what a session says to the
caller back to the job loop and out as LiveKit data packets.

Data packets are best-effort, also the "reliable" ones: LiveKit does not buffer
them for a participant that is not connected at that moment, and documents a
limit of 15 KiB per reliable packet (the SDK itself raises past ~64 KB). So the
sink never sends more than 15 KiB in one packet, keeps `turn_metrics` small
(its texts are cut to `TEXT_CAP_CHARS`), holds packets while the room
reconnects, and counts (never raises) what it could not send.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from .channels import CONTROL_LABEL, TOKENS_LABEL

if TYPE_CHECKING:
    from livekit import rtc

    from ..core import Bridge

log = logging.getLogger("voxbus.livekit")

T = TypeVar("T")

TOKENS_TOPIC = TOKENS_LABEL
CONTROL_TOPIC = CONTROL_LABEL
# Lossy packets larger than one MTU are fragmented and dropped whole on any loss;
# a token payload that big (rare) goes reliable instead.
MAX_LOSSY_BYTES = 1300
MAX_PACKET_BYTES = 15 * 1024  # LiveKit's documented limit for one reliable data packet
TEXT_CAP_CHARS = 512  # each text of a turn_metrics message (user, agent, heard) is cut to this
TEXT_FIELDS = ("user_text", "agent_text", "heard_text")
PUBLISH_TIMEOUT_S = 5.0  # a publish_data that blocks longer is counted as failed


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


def compact_control(msg: dict[str, Any]) -> dict[str, Any]:
    """`msg` as sent over LiveKit: a turn_metrics message has its texts cut to TEXT_CAP_CHARS
    (the cut fields are listed in `truncated`); any other message is unchanged."""
    if msg.get("type") != "turn_metrics":
        return msg
    cut = [f for f in TEXT_FIELDS if isinstance(msg.get(f), str) and len(msg[f]) > TEXT_CAP_CHARS]
    if not cut:
        return msg
    out = dict(msg)
    for f in cut:
        out[f] = msg[f][:TEXT_CAP_CHARS - 1] + "…"
    out["truncated"] = cut
    return out


class LiveKitSink:
    """ClientSink over LiveKit data packets: callable from any thread, sends on the job loop.

    One FIFO keeps tokens and control in the order the session produced them.
    A caller that cannot keep up loses tokens first (they are lossy anyway),
    then the oldest control. While `hold()` is on (the room is reconnecting)
    nothing is published: control waits in the queue, new tokens are dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_pending: int = 512,
                 publish_timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self._loop = loop
        self._max_pending = max_pending
        self._publish_timeout_s = publish_timeout_s
        self._queue: collections.deque[tuple[bytes, bool, str]] = collections.deque()
        self._wake = asyncio.Event()
        self._online = asyncio.Event()
        self._online.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.sent: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()

    def send_tokens(self, turn: int, seq: int, text: str, final: bool) -> None:
        payload = orjson.dumps({"t": turn, "s": seq, "d": text, "f": final})
        self._post(payload, len(payload) > MAX_LOSSY_BYTES, TOKENS_TOPIC)

    def send_control(self, msg: dict[str, Any]) -> None:
        self._post(orjson.dumps(compact_control(msg), option=orjson.OPT_SERIALIZE_NUMPY), True, CONTROL_TOPIC)

    def hold(self) -> None:
        """Publish nothing until `resume()` (call on the job loop)."""
        self._online.clear()

    def resume(self) -> None:
        self._online.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until everything queued was handed to LiveKit; True if it was."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _post(self, payload: bytes, reliable: bool, topic: str) -> None:
        if len(payload) > MAX_PACKET_BYTES:
            self.dropped[f"{topic}_oversize"] += 1
            log.warning("a %d-byte packet on %s is over LiveKit's %d-byte limit: not sent", len(payload), topic,
                        MAX_PACKET_BYTES)
            return
        try:
            self._loop.call_soon_threadsafe(self._enqueue, payload, reliable, topic)
        except RuntimeError:  # the job's loop is closed: the call is over
            self.dropped["call_over"] += 1

    def _enqueue(self, payload: bytes, reliable: bool, topic: str) -> None:
        if topic == TOKENS_TOPIC and not self._online.is_set():
            self.dropped["tokens_offline"] += 1  # stale by the time the room is back
            return
        if len(self._queue) >= self._max_pending:
            if topic == TOKENS_TOPIC:
                self.dropped["tokens_backlog"] += 1
                return
            self._queue.popleft()
            self.dropped["backlog"] += 1
        self._queue.append((payload, reliable, topic))
        self._idle.clear()
        self._wake.set()

    async def run(self, participant: rtc.LocalParticipant) -> None:
        """Send queued packets until cancelled; a failed or stuck send is counted, never raised."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._online.wait()
                if not self._queue:
                    break
                payload, reliable, topic = self._queue.popleft()
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                    async with asyncio.timeout(self._publish_timeout_s):
                        await participant.publish_data(payload, reliable=reliable, topic=topic)
                    self.sent[topic] += 1
                except TimeoutError:
                    self.dropped[f"{topic}_send_timeout"] += 1
                    log.debug("publish_data on %s took over %.1f s; given up", topic, self._publish_timeout_s)
                except Exception as exc:  # PublishDataError while (re)connecting, or a closed room
                    self.dropped[f"{topic}_send_failed"] += 1
                    log.debug("publish_data on %s failed: %s", topic, exc)
            self._idle.set()
