"""The wire contract (shared/protocol.py): round trips, validation and hostile input.

Every member of `protocol.AnyMessage` is built with every field set to a
non-default value and must survive encode/decode unchanged, so a new message
type is covered as soon as it joins the union. Malformed input of any kind must
raise `ProtocolError`, never another exception and never a half-decoded message.
"""

from __future__ import annotations

import enum
import random
import types
import typing
from typing import Any

import msgspec
import pytest

from shared import protocol
from shared.protocol import (
    ENTRY_FIELD,
    FRAME_BYTES,
    MAX_ENTRY_BYTES,
    MAX_FRAME_BYTES,
    MAX_OUT_CHUNK_BYTES,
    MAX_TEXT_CHARS,
    SAMPLE_RATE,
    AsrJob,
    AudioFrame,
    AudioOut,
    Cancel,
    DeadLetter,
    Keys,
    LlmJob,
    ProtocolError,
    TokenChunk,
    Transcript,
)

MESSAGE_TYPES: tuple[type[protocol.Message], ...] = typing.get_args(protocol.AnyMessage)

# Field values that must satisfy a message's own checks (rate, PCM size); other
# fields get a value derived from their type.
FIELD_SAMPLES: dict[str, Any] = {
    "session": "sess-1.A_b",
    "pcm": bytes(range(256)) * 2 + bytes(128),  # 640 bytes: one 20 ms frame
    "rate": SAMPLE_RATE,
    "ts": 1_700_000_000.25,
}


def _sample_for_type(tp: Any, default: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = [c for c in typing.get_args(tp) if c != default]
        return choices[-1]
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _sample_for_type(inner[0], default)
    if origin is dict:
        return {"key-a": _sample_for_type(typing.get_args(tp)[1], None)}
    if origin is list:
        return [_sample_for_type(typing.get_args(tp)[0], None)]
    if tp is bool:
        return not default if isinstance(default, bool) else True
    if tp is int:
        return 4242
    if tp is float:
        return 12.5
    if tp is str:
        return "ünïcode text ✓"
    if tp is bytes:
        return b"\x00\x01" * 8
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m for m in tp if m != default][-1]
    raise AssertionError(f"no sample value for type {tp!r}: extend _sample_for_type")


def build_sample(cls: type[protocol.Message]) -> protocol.Message:
    """An instance of `cls` with every field set, and set to a non-default value."""
    kwargs: dict[str, Any] = {}
    for f in msgspec.structs.fields(cls):
        default = None if f.default is msgspec.NODEFAULT else f.default
        kwargs[f.name] = FIELD_SAMPLES[f.name] if f.name in FIELD_SAMPLES else _sample_for_type(f.type, default)
    return cls(**kwargs)


def raw(tag: str, **fields: Any) -> bytes:
    """A msgpack map as a foreign producer could write it (no validation on this side)."""
    return msgspec.msgpack.encode({"type": tag, **fields})


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_every_message_type_round_trips_with_all_fields_set(cls: type[protocol.Message]) -> None:
    msg = build_sample(cls)
    for f in msgspec.structs.fields(cls):  # omit_defaults would hide a field left at its default
        if f.default is not msgspec.NODEFAULT and f.name not in FIELD_SAMPLES:
            assert getattr(msg, f.name) != f.default, f"{cls.__name__}.{f.name} sample equals its default"

    data = protocol.encode(msg)
    back = protocol.decode(data)
    assert type(back) is cls
    assert back == msg
    assert protocol.decode_entry(protocol.entry(msg)) == msg
    assert protocol.decode_as(data, cls) == msg


def test_every_message_tag_is_unique_and_versioned() -> None:
    tags = [cls.__struct_config__.tag for cls in MESSAGE_TYPES]
    assert len(set(tags)) == len(tags)
    for tag in tags:
        name, _, version = tag.rpartition("/")
        assert name and version.isdigit(), f"tag {tag!r} lacks a /<version> suffix"
    assert protocol.KNOWN_TAGS == frozenset(tags)


def test_dead_letter_round_trips() -> None:
    letter = DeadLetter(source="vb:pool:x:jobs", entry_id="1-2", reason="malformed: x", payload=b"\xc1\x00", deliveries=3)
    assert protocol.decode_dead_letter(protocol.encode(letter)) == letter


def test_entry_ids_are_explicit_and_ordered() -> None:
    assert protocol.frame_entry_id(0) == "1-0"
    for seq in (0, 1, 49, 10**9):
        assert protocol.frame_seq(protocol.frame_entry_id(seq)) == seq
        assert protocol.frame_seq(protocol.frame_entry_id(seq).encode()) == seq
    assert protocol.output_entry_id(0, 0) == "1-0"
    assert protocol.output_entry_id(3, 7) == "4-7"
    lo, hi = protocol.turn_range(3)
    assert lo == "4-0" and hi.startswith("4-")
    assert int(hi.split("-")[1]) == 2**64 - 1


def test_session_keys_share_one_hash_tag_and_have_bounds() -> None:
    sid = "abc-1"
    keys = Keys.session_streams(sid) + [Keys.ctx(sid), Keys.meta(sid), Keys.cancelled_turn(sid), Keys.cancel_channel(sid)]
    assert all(f"{{{sid}}}" in k for k in keys)
    assert len(set(keys)) == len(keys)
    assert protocol.maxlen_for(Keys.audio_in(sid)) == protocol.STREAM_MAXLEN["audio.in"]
    assert protocol.maxlen_for(Keys.pool_jobs("asr-a")) == protocol.STREAM_MAXLEN["jobs"]
    assert protocol.maxlen_for(Keys.pool_dlq("asr-a")) == protocol.STREAM_MAXLEN["dlq"]


# ---------------------------------------------------------------- validation


BAD_SESSION_IDS = ["", "a b", "a{b", "b}", "a:b", "x" * 65, "é", "a\n", "a/b", "*"]


@pytest.mark.parametrize("sid", BAD_SESSION_IDS)
def test_invalid_session_id_is_rejected_everywhere(sid: str) -> None:
    with pytest.raises(ProtocolError, match="invalid session id"):
        Keys.audio_in(sid)
    with pytest.raises(ProtocolError, match="invalid session id"):
        Cancel(session=sid, turn=1)
    with pytest.raises(ProtocolError, match="invalid session id"):
        protocol.decode(raw("cancel/1", session=sid, turn=1))


def test_session_id_of_wrong_type_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="invalid session id"):
        protocol.validate_session_id(5)  # type: ignore[arg-type]
    assert protocol.validate_session_id("x" * 64) == "x" * 64


@pytest.mark.parametrize("pool", ["", "Asr", "-asr", "a b", "a:b", "a" * 64])
def test_invalid_pool_name_is_rejected(pool: str) -> None:
    with pytest.raises(ProtocolError, match="invalid pool name"):
        Keys.pool_jobs(pool)


def test_audio_frame_with_wrong_sample_rate_is_rejected() -> None:
    with pytest.raises(ValueError, match=f"{SAMPLE_RATE} Hz, got 8000"):
        AudioFrame(session="s", seq=0, pcm=bytes(FRAME_BYTES), rate=8000)
    with pytest.raises(ProtocolError, match="16000 Hz"):
        protocol.decode(raw("audio.frame/1", session="s", seq=0, pcm=bytes(FRAME_BYTES), rate=48000))


@pytest.mark.parametrize("size", [0, 1, FRAME_BYTES - 1, MAX_FRAME_BYTES + 2, MAX_FRAME_BYTES * 4])
def test_audio_frame_with_odd_empty_or_oversized_pcm_is_rejected(size: int) -> None:
    with pytest.raises(ValueError, match=f"frame of {size} bytes"):
        AudioFrame(session="s", seq=0, pcm=bytes(size))
    with pytest.raises(ProtocolError, match=f"frame of {size} bytes"):
        protocol.decode(raw("audio.frame/1", session="s", seq=0, pcm=bytes(size)))


def test_audio_frame_sizes_within_limits_are_accepted() -> None:
    for size in (2, FRAME_BYTES, MAX_FRAME_BYTES):
        assert len(AudioFrame(session="s", seq=0, pcm=bytes(size)).pcm) == size


def test_agent_audio_chunk_limits() -> None:
    with pytest.raises(ValueError, match="outside 8000..48000"):
        AudioOut(session="s", turn=0, seq=0, pcm=bytes(4), rate=96_000)
    with pytest.raises(ValueError, match="odd or too large"):
        AudioOut(session="s", turn=0, seq=0, pcm=bytes(3), rate=24_000)
    with pytest.raises(ProtocolError, match="odd or too large"):
        protocol.decode(raw("audio.out/1", session="s", turn=0, seq=0, pcm=bytes(MAX_OUT_CHUNK_BYTES + 2), rate=24_000))


TEXT_TYPES = [cls for cls in MESSAGE_TYPES if "text" in {f.name for f in msgspec.structs.fields(cls)}]


def sample_fields(cls: type[protocol.Message]) -> dict[str, Any]:
    return {f.name: getattr(build_sample(cls), f.name) for f in msgspec.structs.fields(cls)}


@pytest.mark.parametrize("cls", TEXT_TYPES, ids=lambda c: c.__name__)
def test_over_long_text_is_rejected(cls: type[protocol.Message]) -> None:
    fields = sample_fields(cls)
    assert len(cls(**{**fields, "text": "x" * MAX_TEXT_CHARS}).text) == MAX_TEXT_CHARS
    with pytest.raises(ValueError, match=f"longer than {MAX_TEXT_CHARS} characters"):
        cls(**{**fields, "text": "x" * (MAX_TEXT_CHARS + 1)})
    wire = {**fields, "type": cls.__struct_config__.tag, "text": "y" * (MAX_TEXT_CHARS + 1)}
    with pytest.raises(ProtocolError, match=f"longer than {MAX_TEXT_CHARS}"):
        protocol.decode(msgspec.msgpack.encode(wire))


def test_text_types_include_transcripts_and_tokens() -> None:
    assert {Transcript, TokenChunk} <= set(TEXT_TYPES)


# ---------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "data",
    [
        raw("nope/1", session="s"),
        raw("audio.frame/2", session="s", seq=0, pcm=bytes(FRAME_BYTES)),  # unknown version
        raw("audio.frame/0", session="s", seq=0, pcm=bytes(FRAME_BYTES)),
        raw("audio.frame", session="s", seq=0, pcm=bytes(FRAME_BYTES)),  # unversioned
        msgspec.msgpack.encode({"session": "s", "turn": 1}),  # no tag at all
        raw("job.asr/1", session="s", turn="one", start_seq=0, end_seq=1),  # wrong field type
        raw("job.asr/1", session="s", start_seq=0, end_seq=1),  # missing required field
        msgspec.msgpack.encode(["cancel/1", "s", 1]),
        msgspec.msgpack.encode(42),
        b"",
        b"\xc1",  # the one byte msgpack never uses
        protocol.encode(Cancel(session="s", turn=1)) + b"\x00",  # trailing garbage
    ],
    ids=[
        "unknown-tag", "version-2", "version-0", "unversioned", "untagged", "wrong-type", "missing-field",
        "array", "int", "empty", "reserved-byte", "trailing-bytes",
    ],
)
def test_malformed_payload_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(data)


def test_every_truncation_of_a_valid_message_raises_protocol_error() -> None:
    for msg in (AudioFrame(session="s", seq=3, pcm=bytes(FRAME_BYTES)), build_sample(protocol.SessionMeta)):
        data = protocol.encode(msg)
        for cut in range(len(data)):
            with pytest.raises(ProtocolError):
                protocol.decode(data[:cut])


def test_random_bytes_raise_protocol_error() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        blob = rng.randbytes(rng.randint(0, 400))
        with pytest.raises(ProtocolError):
            protocol.decode(blob)


def test_oversized_entry_is_rejected_before_decoding() -> None:
    big = raw("transcript/1", session="s", turn=1, text="x" * (MAX_ENTRY_BYTES + 10))
    with pytest.raises(ProtocolError, match=f"exceeds {MAX_ENTRY_BYTES}"):
        protocol.decode(big)
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(bytes(MAX_ENTRY_BYTES + 1))


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="expected bytes, got str"):
        protocol.decode("cancel/1")  # type: ignore[arg-type]
    msg = Cancel(session="s", turn=2, ts=1.0)
    assert protocol.decode(bytearray(protocol.encode(msg))) == msg
    assert protocol.decode(memoryview(protocol.encode(msg))) == msg


@pytest.mark.parametrize(
    "fields",
    [{}, {b"x": protocol.encode(Cancel(session="s", turn=1))}, {ENTRY_FIELD: b"\x80", b"extra": b"1"}],
    ids=["no-field", "wrong-field-name", "extra-field"],
)
def test_entry_with_wrong_fields_is_rejected(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(ProtocolError, match="exactly the field 'm'"):
        protocol.decode_entry(fields)


def test_decode_as_rejects_a_message_of_another_type() -> None:
    data = protocol.encode(LlmJob(session="s", turn=1))
    with pytest.raises(ProtocolError, match="unexpected message job.llm/1, expected job.asr/1"):
        protocol.decode_as(data, AsrJob)
    assert isinstance(protocol.decode_as(data, AsrJob, LlmJob), LlmJob)
