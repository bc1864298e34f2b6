"""The two data channels of a call: `llm_tokens` out, `control` both ways.

The CLIENT creates both channels before its offer (browsers need no extra
negotiation step that way); the bridge binds to them by label when they open:

- `llm_tokens` (client creates it ordered=false, maxRetransmits=0): token
  deltas as compact JSON `{"t": turn, "s": seq, "d": text, "f": final}`.
  Lossy by design: a late token is worth nothing, and the final text arrives
  reliably in `turn_metrics.agent_text` on `control`.
- `control` (reliable, ordered): session metadata to the client (everything
  CallSession sends: state, transcript, turn_metrics, interrupted, error, ...;
  plus one `session` hello), and client requests to the bridge:
  `{"type": "interrupt"}` and `{"type": "ping", "id": ...}`.

Client input is hostile until proven otherwise: oversized, malformed,
non-object, unknown-type and wrong-field-type messages are dropped with a
counter (shared.metrics.CONTROL_REJECTED and `ControlChannel.rejected`); a
message naming another session is dropped too, because the session is bound
to this peer connection, never to what a message claims.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from aiortc import RTCDataChannel

from shared import metrics

log = logging.getLogger("voxbus.webrtc")

TOKENS_LABEL = "llm_tokens"
CONTROL_LABEL = "control"
MAX_PENDING_CONTROL = 256  # control messages kept while the channel is not open yet
MAX_BUFFERED_BYTES = 1 << 20  # a peer that stops reading loses messages, the bridge keeps its memory


def _dumps(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class ChannelSink:
    """ClientSink over the call's data channels (bound once the client's channels open)."""

    def __init__(self) -> None:
        self.tokens: RTCDataChannel | None = None
        self.control: RTCDataChannel | None = None
        self._pending: collections.deque[str] = collections.deque(maxlen=MAX_PENDING_CONTROL)
        self.dropped: collections.Counter[str] = collections.Counter()

    def bind(self, channel: RTCDataChannel) -> bool:
        """Take a client channel by label; False for an unknown or already bound label."""
        if channel.label == TOKENS_LABEL and self.tokens is None:
            self.tokens = channel
            return True
        if channel.label == CONTROL_LABEL and self.control is None:
            self.control = channel
            if channel.readyState == "open":
                self.flush()
            else:
                channel.on("open", self.flush)
            return True
        return False

    def flush(self) -> None:
        while self._pending and self._send(self.control, self._pending[0], "control"):
            self._pending.popleft()

    def send_tokens(self, turn: int, seq: int, text: str, final: bool) -> None:
        self._send(self.tokens, _dumps({"t": turn, "s": seq, "d": text, "f": final}), "tokens")

    def send_control(self, msg: dict[str, Any]) -> None:
        data = _dumps(msg)
        if self._pending or not self._send(self.control, data, "control", count=False):
            if len(self._pending) == self._pending.maxlen:
                self.dropped["control_backlog"] += 1
            self._pending.append(data)

    def _send(self, channel: RTCDataChannel | None, data: str, kind: str, count: bool = True) -> bool:
        if channel is None or channel.readyState != "open":
            if count:
                self.dropped[f"{kind}_not_open"] += 1
            return False
        if channel.bufferedAmount > MAX_BUFFERED_BYTES:
            self.dropped[f"{kind}_congested"] += 1
            return True  # dropped for good: retrying would only grow the backlog
        try:
            channel.send(data)
        except Exception as exc:  # InvalidStateError on a closing channel, ValueError past the peer's size limit
            self.dropped[f"{kind}_send_failed"] += 1
            log.debug("data channel %s: send failed: %s", channel.label, exc)
        return True


class ControlChannel:
    """Parses and dispatches client messages of one call; never raises."""

    def __init__(self, session_id: str, max_bytes: int, *, on_interrupt: Callable[[], None],
                 reply: Callable[[dict[str, Any]], None]) -> None:
        self.session_id = session_id
        self.max_bytes = max_bytes
        self.on_interrupt = on_interrupt
        self.reply = reply
        self.rejected: collections.Counter[str] = collections.Counter()
        self.accepted: collections.Counter[str] = collections.Counter()
        self.interrupt_at: float | None = None  # wall clock of the last interrupt received

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        metrics.CONTROL_REJECTED.labels(reason).inc()

    def handle(self, raw: object) -> None:
        try:
            self._handle(raw)
        except Exception:
            log.exception("session %s: control message handler failed", self.session_id)
            self.reject("handler_error")

    def _handle(self, raw: object) -> None:
        if isinstance(raw, str):
            # cheap bound first: a str has at least as many UTF-8 bytes as characters
            size = len(raw) if len(raw) > self.max_bytes else len(raw.encode("utf-8", "surrogatepass"))
        elif isinstance(raw, (bytes, bytearray, memoryview)):
            size = len(raw)
        else:
            self.reject("bad_frame")
            return
        if size > self.max_bytes:
            self.reject("too_large")
            return
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.reject("bad_json")
            return
        if not isinstance(msg, dict):
            self.reject("not_object")
            return
        kind = msg.get("type")
        if not isinstance(kind, str):
            self.reject("bad_type")
            return
        handler = _HANDLERS.get(kind)
        if handler is None:
            self.reject("unknown_type")
            return
        handler(self, msg)

    def _interrupt(self, msg: dict[str, Any]) -> None:
        named = msg.get("session", msg.get("session_id"))
        if named is not None and named != self.session_id:
            self.reject("foreign_session")
            return
        self.accepted["interrupt"] += 1
        self.interrupt_at = time.time()
        self.on_interrupt()

    def _ping(self, msg: dict[str, Any]) -> None:
        ping_id = msg.get("id")
        if ping_id is not None and not (isinstance(ping_id, (int, float, str)) and len(str(ping_id)) <= 64):
            self.reject("bad_field")
            return
        self.accepted["ping"] += 1
        self.reply({"type": "pong", "id": ping_id, "ts": time.time()})


_HANDLERS: dict[str, Callable[[ControlChannel, dict[str, Any]], None]] = {
    "interrupt": ControlChannel._interrupt,
    "ping": ControlChannel._ping,
}
