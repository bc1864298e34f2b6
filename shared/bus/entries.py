"""Stream entries as the bus sees them: which stream and session a key is, checking an entry
belongs where it was read, reply shapes (RESP2, RESP3 and redis-py's RESP3 callback),
and dead-lettering what does not.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from .. import metrics
from ..protocol import (
    ENTRY_FIELD,
    MAX_ENTRY_BYTES,
    STREAM_TYPES,
    AnyMessage,
    DeadLetter,
    ProtocolError,
    RejectReason,
    decode_entry,
    encode,
    maxlen_for,
)


def stream_kind(key: str) -> str:
    return key.rsplit(":", 1)[-1]


def session_of(key: str) -> str | None:
    """The session id inside a per-session key's hash tag, or None."""
    start, end = key.find("{"), key.find("}")
    return key[start + 1 : end] if 0 <= start < end else None


def check_entry(key: str, fields: dict[bytes, bytes]) -> AnyMessage:
    """Decode an entry of a per-session stream and check it belongs there.

    Raises ProtocolError (with its RejectReason) when the entry is malformed, of
    a type this stream does not carry, or names another session than the stream's.
    """
    msg = decode_entry(fields)
    allowed = STREAM_TYPES.get(stream_kind(key))
    if allowed is not None and not isinstance(msg, allowed):
        raise ProtocolError(f"{type(msg).__name__} does not belong in a {stream_kind(key)} stream",
                            RejectReason.WRONG_TYPE)
    sid = session_of(key)
    if sid is not None and msg.session != sid:
        raise ProtocolError(f"entry names session {msg.session!r} but sits in {sid!r}'s stream",
                            RejectReason.WRONG_SESSION)
    return msg


def field_map(fields: Any) -> dict[bytes, bytes]:
    """An entry's flat [field, value, ...] reply as a dict (a dict reply passes through)."""
    if isinstance(fields, dict):
        return fields
    if not fields:
        return {}
    if len(fields) == 2:
        return {fields[0]: fields[1]}
    return dict(zip(fields[::2], fields[1::2]))


def stream_replies(reply: Any) -> list[tuple[Any, list[Any]]]:
    """(key, entries) pairs of one raw XREAD reply: a RESP2 array or a RESP3 map."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(item[0], item[1]) for item in reply]


def redis_py_replies(reply: Any) -> list[tuple[Any, list[Any]]]:
    """(key, entries) pairs of an XREAD reply that went through redis-py's response callback, whose
    RESP3 form nests each stream's entries one level deeper ({key: [entries]})."""
    if isinstance(reply, dict):
        return [(key, value[0]) for key, value in reply.items()]
    return stream_replies(reply)


async def dead_letter(redis: aioredis.Redis, dlq: str, letter: DeadLetter, kind: str) -> None:
    """Append a rejected entry to a dead-letter stream (bounded) and count it."""
    await redis.xadd(dlq, {ENTRY_FIELD: encode(letter)}, maxlen=maxlen_for(dlq), approximate=True)
    metrics.BUS_DEAD_LETTERED.labels(kind).inc()


def count_rejected(kind: str, reason: RejectReason) -> None:
    metrics.BUS_REJECTED.labels(kind, reason.value).inc()


def letter_for(source: str, entry_id: str, fields: dict[bytes, bytes], reason: str, deliveries: int = 0) -> DeadLetter:
    """A dead letter carrying the refused entry's payload (its `m` field, or all its fields)."""
    payload = fields.get(ENTRY_FIELD) or b"".join(k + b"=" + v for k, v in fields.items())
    return DeadLetter(source=source, entry_id=entry_id, reason=reason, payload=payload[:MAX_ENTRY_BYTES],
                      deliveries=deliveries)
