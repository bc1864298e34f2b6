"""The bus client (shared/bus.py) against a real Redis.

BatchPublisher: entries land, explicit ids refuse duplicates, streams stay
bounded, one bad entry does not sink its batch. StreamMux: many sessions through
one reader in order, and 10,000 garbage entries mixed into per-session streams
end up in `Keys.DLQ` (counted in the metrics) while every valid entry arrives.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Callable

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from shared.bus import BatchPublisher, StreamMux, check_entry, session_of
from shared.protocol import (
    ENTRY_FIELD,
    FRAME_BYTES,
    MAX_ENTRY_BYTES,
    STREAM_MAXLEN,
    AudioFrame,
    Keys,
    ProtocolError,
    TokenChunk,
    TurnMark,
    decode_dead_letter,
    encode,
    frame_entry_id,
    output_entry_id,
)
from tests.support.prom import label_values

PCM = bytes(FRAME_BYTES)


def frame(sid: str, seq: int) -> AudioFrame:
    return AudioFrame(session=sid, seq=seq, pcm=PCM)


async def read_until(mux: StreamMux, done: Callable[[list], bool], timeout: float = 15.0) -> list:
    got: list = []
    async with asyncio.timeout(timeout):
        while not done(got):
            got.extend(await mux.read())
    return got


# ---------------------------------------------------------------- publisher


async def test_publisher_and_mux_carry_many_sessions_in_order(redis: aioredis.Redis, uid: str) -> None:
    sids = [f"{uid}-{i}" for i in range(30)]
    frames = 20
    mux = StreamMux(redis, block_ms=20)
    for sid in sids:
        await mux.add(Keys.audio_in(sid))
    pub = BatchPublisher(redis)
    try:
        for seq in range(frames):
            ids = await asyncio.gather(
                *(pub.publish(Keys.audio_in(sid), frame(sid, seq), entry_id=frame_entry_id(seq)) for sid in sids)
            )
            assert ids == [frame_entry_id(seq).encode()] * len(sids)
        got = await read_until(mux, lambda g: len(g) >= len(sids) * frames)
    finally:
        await pub.aclose()

    assert len(got) == len(sids) * frames
    per_session: dict[str, list[int]] = defaultdict(list)
    for item in got:
        assert item.entry_id == frame_entry_id(item.msg.seq).encode()
        assert item.key == Keys.audio_in(item.msg.session)
        per_session[item.msg.session].append(item.msg.seq)
    assert per_session == {sid: list(range(frames)) for sid in sids}


async def test_same_turn_and_seq_published_twice_yields_one_entry(redis: aioredis.Redis, uid: str) -> None:
    sid = f"dup-{uid}"
    key = Keys.tokens(sid)
    dups = REGISTRY.get_sample_value("voxbus_bus_duplicates_total", {"kind": "tokens"}) or 0.0
    pub = BatchPublisher(redis)
    try:
        first = await pub.publish(key, TokenChunk(session=sid, turn=2, seq=0, text="Hel"), entry_id=output_entry_id(2, 0))
        second = await pub.publish(key, TokenChunk(session=sid, turn=2, seq=0, text="Hel"), entry_id=output_entry_id(2, 0))
        # Both copies in one batch (a retried job racing the original): still one entry.
        a = pub.publish_nowait(key, TokenChunk(session=sid, turn=2, seq=1, text="lo"), entry_id=output_entry_id(2, 1))
        b = pub.publish_nowait(key, TokenChunk(session=sid, turn=2, seq=1, text="lo"), entry_id=output_entry_id(2, 1))
        pair = await asyncio.gather(a, b)
        # An output older than the stream's top is refused the same way.
        older = await pub.publish(key, TokenChunk(session=sid, turn=1, seq=9, text="old"), entry_id=output_entry_id(1, 9))
    finally:
        await pub.aclose()

    assert first == b"3-0"
    assert second is None
    assert pair == [b"3-1", None]
    assert older is None
    entries = await redis.xrange(key)
    assert [e[0] for e in entries] == [b"3-0", b"3-1"]
    assert (REGISTRY.get_sample_value("voxbus_bus_duplicates_total", {"kind": "tokens"}) or 0.0) - dups == 3


async def test_stream_lengths_stay_near_maxlen(redis: aioredis.Redis, uid: str) -> None:
    sid = f"len-{uid}"
    pub = BatchPublisher(redis)
    try:
        # Default bound of the events stream, far exceeded.
        bound = STREAM_MAXLEN["events"]
        await asyncio.gather(
            *(pub.publish(Keys.events(sid), TurnMark(session=sid, turn=i, stage="asr", mark="m")) for i in range(bound + 3000))
        )
        # An explicit bound.
        await asyncio.gather(
            *(pub.publish(Keys.audio_in(sid), frame(sid, i), maxlen=300, entry_id=frame_entry_id(i)) for i in range(4000))
        )
    finally:
        await pub.aclose()
    # MAXLEN ~ trims whole radix-tree nodes only, so a little above the bound is expected.
    events_len = await redis.xlen(Keys.events(sid))
    assert bound <= events_len <= bound * 1.1 + 200
    audio_len = await redis.xlen(Keys.audio_in(sid))
    assert 300 <= audio_len <= 500
    newest = await redis.xrevrange(Keys.audio_in(sid), count=1)
    assert newest[0][0] == frame_entry_id(3999).encode()  # trimming drops the oldest, never the newest


async def test_close_flushes_queued_entries_and_refuses_more(redis: aioredis.Redis, uid: str) -> None:
    sid = f"close-{uid}"
    pub = BatchPublisher(redis, max_batch=64)
    futures = [pub.publish_nowait(Keys.events(sid), TurnMark(session=sid, turn=i, stage="s", mark="m")) for i in range(1000)]
    await pub.aclose()
    assert all(f.done() and f.result() for f in futures)
    assert await redis.xlen(Keys.events(sid)) == 1000
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish_nowait(Keys.events(sid), TurnMark(session=sid, turn=0, stage="s", mark="m"))


async def test_a_failing_entry_fails_alone_and_the_publisher_keeps_going(redis: aioredis.Redis, uid: str) -> None:
    sid = f"wrongtype-{uid}"
    await redis.set(Keys.events(sid), "not a stream")
    pub = BatchPublisher(redis)
    try:
        good = pub.publish_nowait(Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=0, text="a"))
        bad = pub.publish_nowait(Keys.events(sid), TurnMark(session=sid, turn=0, stage="s", mark="m"))
        good2 = pub.publish_nowait(Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=1, text="b"))
        results = await asyncio.gather(good, bad, good2, return_exceptions=True)
        assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
        assert isinstance(results[0], bytes) and isinstance(results[2], bytes)
        later = await pub.publish(Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=2, text="c"))
        assert later is not None
    finally:
        await pub.aclose()
    assert await redis.xlen(Keys.tokens(sid)) == 3


# ---------------------------------------------------------------- mux


async def test_mux_add_from_now_skips_history_and_remove_stops_following(redis: aioredis.Redis, uid: str) -> None:
    a, b = f"a-{uid}", f"b-{uid}"
    for seq in range(5):
        await redis.xadd(Keys.audio_in(a), {ENTRY_FIELD: encode(frame(a, seq))}, id=frame_entry_id(seq))
    mux = StreamMux(redis, block_ms=20)
    await mux.add(Keys.audio_in(a))  # "$": only what comes next
    await mux.add(Keys.audio_in(b), last_id="0-0")
    assert Keys.audio_in(a) in mux and len(mux) == 2
    await redis.xadd(Keys.audio_in(a), {ENTRY_FIELD: encode(frame(a, 5))}, id=frame_entry_id(5))
    await redis.xadd(Keys.audio_in(b), {ENTRY_FIELD: encode(frame(b, 0))}, id=frame_entry_id(0))
    got = await read_until(mux, lambda g: len(g) >= 2)
    assert sorted((r.msg.session, r.msg.seq) for r in got) == sorted([(a, 5), (b, 0)])

    mux.remove(Keys.audio_in(b))
    assert Keys.audio_in(b) not in mux
    await redis.xadd(Keys.audio_in(b), {ENTRY_FIELD: encode(frame(b, 1))}, id=frame_entry_id(1))
    await redis.xadd(Keys.audio_in(a), {ENTRY_FIELD: encode(frame(a, 6))}, id=frame_entry_id(6))
    got = await read_until(mux, lambda g: len(g) >= 1)
    assert [(r.msg.session, r.msg.seq) for r in got] == [(a, 6)]
    assert await mux.read() == []


async def test_a_stream_removed_while_a_sharded_round_is_in_flight_is_not_read(redis: aioredis.Redis, uid: str) -> None:
    """More streams than one shard: the first (non-blocking) write of a round is awaited, and a call
    that closes meanwhile removes its stream; the blocking read that follows must leave it out, not
    fail the bridge's reader with a KeyError (seen in ops/bench/capacity.py at 200 callers)."""
    keys = [Keys.events(f"{uid}-{i}") for i in range(5)]
    mux = StreamMux(redis, block_ms=20, shard_size=2)
    for key in keys:
        await mux.add(key, last_id="0-0")
    node = mux._node
    wire_call = node._wire.call  # type: ignore[attr-defined]
    calls = 0

    async def call_then_close_one(data: bytes, n: int = 1) -> list[object]:
        nonlocal calls
        calls += 1
        replies = await wire_call(data, n)
        if calls == 1:
            mux.remove(keys[3])  # the call ends while its shard's reply is on the way
        return replies

    node._wire.call = call_then_close_one  # type: ignore[attr-defined]
    assert await mux.read() == [] and calls == 2 and keys[3] not in mux
    await redis.xadd(keys[1], {ENTRY_FIELD: encode(TurnMark(session=f"{uid}-1", turn=0, stage="asr", mark="m"))})
    got = await read_until(mux, lambda g: len(g) >= 1)
    assert [r.msg.session for r in got] == [f"{uid}-1"]


def test_check_entry_rejects_other_sessions_and_foreign_types() -> None:
    key = Keys.audio_in("alice")
    assert session_of(key) == "alice"
    assert check_entry(key, {ENTRY_FIELD: encode(frame("alice", 1))}).seq == 1
    with pytest.raises(ProtocolError, match="names session 'bob'"):
        check_entry(key, {ENTRY_FIELD: encode(frame("bob", 1))})
    with pytest.raises(ProtocolError, match="does not belong in a audio.in stream"):
        check_entry(key, {ENTRY_FIELD: encode(TokenChunk(session="alice", turn=0, seq=0, text="x"))})
    with pytest.raises(ProtocolError, match="does not belong in a events stream"):
        check_entry(Keys.events("alice"), {ENTRY_FIELD: encode(frame("alice", 1))})


def session_garbage(rng: random.Random, sid: str, other: str, kind: str, i: int) -> dict[bytes, bytes]:
    """One entry that a reader of `sid`'s `kind` stream must reject."""
    valid = frame(sid, i) if kind == "audio.in" else TurnMark(session=sid, turn=i, stage="asr", mark="m")
    choice = i % 9
    if choice == 0:
        return {ENTRY_FIELD: rng.randbytes(rng.randint(1, 200))}
    if choice == 1:
        return {ENTRY_FIELD: msgspec.msgpack.encode({"type": f"audio.frame/{i + 2}", "session": sid, "seq": i, "pcm": PCM})}
    if choice == 2:
        data = encode(valid)
        return {ENTRY_FIELD: data[: rng.randint(0, len(data) - 1)]}
    if choice == 3:
        return {b"payload": encode(valid)}  # wrong field name
    if choice == 4:
        return {ENTRY_FIELD: encode(valid), b"extra": b"1"}
    if choice == 5:  # a valid message naming another session
        return {ENTRY_FIELD: encode(frame(other, i) if kind == "audio.in" else TurnMark(session=other, turn=i, stage="a", mark="m"))}
    if choice == 6:  # a valid message of a type this stream does not carry
        return {ENTRY_FIELD: encode(TokenChunk(session=sid, turn=i, seq=0, text="x"))}
    if choice == 7:
        bad = {"type": "turn.mark/1", "session": f"bad id {i}!", "turn": 1, "stage": "a", "mark": "m"}
        return {ENTRY_FIELD: msgspec.msgpack.encode(bad)}
    return {ENTRY_FIELD: b""}


async def test_mux_dead_letters_10k_garbage_entries_and_delivers_every_valid_one(
    redis: aioredis.Redis, uid: str, counter: Callable[..., float]
) -> None:
    rng = random.Random(42)
    a, b = f"ga-{uid}", f"gb-{uid}"
    keys = {Keys.audio_in(a): (a, b, "audio.in"), Keys.audio_in(b): (b, a, "audio.in"), Keys.events(a): (a, b, "events")}
    rows: list[tuple[str, dict[bytes, bytes], bool]] = []
    garbage_per_kind: Counter[str] = Counter()
    valid_expected: set[tuple[str, int]] = set()
    i = 0
    for key, (sid, other, kind) in keys.items():
        for _ in range(3334):
            i += 1
            rows.append((key, session_garbage(rng, sid, other, kind, i), False))
            garbage_per_kind[kind] += 1
        for n in range(300):
            msg = frame(sid, n) if kind == "audio.in" else TurnMark(session=sid, turn=n, stage="asr", mark="m")
            rows.append((key, {ENTRY_FIELD: encode(msg)}, True))
            valid_expected.add((key, n))
    for key in list(keys)[:2]:  # oversized entries: a few are enough
        for n in range(2):
            rows.append((key, {ENTRY_FIELD: b"\x00" * (MAX_ENTRY_BYTES + 100 + n)}, False))
            garbage_per_kind[keys[key][2]] += 1
    rng.shuffle(rows)
    total_garbage = sum(garbage_per_kind.values())
    assert total_garbage >= 10_000

    dlq_top = await redis.xrevrange(Keys.DLQ, count=1)
    dlq_start = dlq_top[0][0] if dlq_top else b"0-0"
    rejected_before = {k: counter("voxbus_bus_rejected_total", kind=k) for k in garbage_per_kind}
    dead_before = {k: counter("voxbus_bus_dead_lettered_total", queue=k) for k in garbage_per_kind}

    mux = StreamMux(redis, block_ms=20, count=500)
    for key in keys:
        await mux.add(key, last_id="0-0")
    garbage_ids: set[tuple[str, bytes]] = set()
    for start in range(0, len(rows), 2000):
        chunk = rows[start : start + 2000]
        pipe = redis.pipeline(transaction=False)
        for key, fields, _ in chunk:
            pipe.xadd(key, fields)
        for (key, _, ok), entry_id in zip(chunk, await pipe.execute()):
            if not ok:
                garbage_ids.add((key, entry_id))

    def all_seen(got: list) -> bool:
        rejected = sum(counter("voxbus_bus_rejected_total", kind=k) - rejected_before[k] for k in garbage_per_kind)
        return len(got) >= len(valid_expected) and rejected >= total_garbage

    got = await read_until(mux, all_seen, timeout=40)
    got.extend(await mux.read())  # nothing more must come

    received = [(r.key, r.msg.seq if isinstance(r.msg, AudioFrame) else r.msg.turn) for r in got]
    assert len(received) == len(set(received)) == len(valid_expected)
    assert set(received) == valid_expected
    for k, n in garbage_per_kind.items():
        assert counter("voxbus_bus_rejected_total", kind=k) - rejected_before[k] == n
        assert counter("voxbus_bus_dead_lettered_total", queue=k) - dead_before[k] == n

    # Keys.DLQ is shared by every reader: keep only this test's letters, then remove them.
    mine: list[bytes] = []
    letters = {}
    cursor = b"(" + dlq_start
    while True:
        batch = await redis.xrange(Keys.DLQ, min=cursor, max="+", count=5000)
        if not batch:
            break
        for dlq_id, fields in batch:
            letter = decode_dead_letter(fields[ENTRY_FIELD])
            if letter.source in keys:
                mine.append(dlq_id)
                letters[(letter.source, letter.entry_id.encode())] = letter
        cursor = b"(" + batch[-1][0]
    try:
        assert set(letters) == garbage_ids
        assert len(mine) == len(garbage_ids)
        for letter in letters.values():
            assert letter.reason and len(letter.payload) <= MAX_ENTRY_BYTES
        reasons = " ".join(letter.reason for letter in letters.values())
        assert "names session" in reasons and "does not belong in a" in reasons and "exactly the field 'm'" in reasons
    finally:
        for i in range(0, len(mine), 1000):
            await redis.xdel(Keys.DLQ, *mine[i : i + 1000])


async def test_mux_rejection_reasons_do_not_become_unbounded_metric_labels(redis: aioredis.Redis, uid: str) -> None:
    """Rejection reasons quote the garbage (sizes, session ids, type tags); used as a
    label they let any producer create unbounded Prometheus time series."""
    sid = f"lbl-{uid}"
    key = Keys.events(sid)
    garbage: list[dict[bytes, bytes]] = []
    for i in range(60):
        garbage.append({ENTRY_FIELD: msgspec.msgpack.encode({"type": f"turn.mark/{i + 2}", "session": sid})})
        bad = {"type": "turn.mark/1", "session": f"bad id {i}!", "turn": 1, "stage": "a", "mark": "m"}
        garbage.append({ENTRY_FIELD: msgspec.msgpack.encode(bad)})
        garbage.append({ENTRY_FIELD: encode(TurnMark(session=f"other-{i}", turn=1, stage="a", mark="m"))})
    for n in range(5):
        garbage.append({ENTRY_FIELD: bytes(MAX_ENTRY_BYTES + 1 + n)})
    before = label_values("voxbus_bus_rejected_total", "reason", kind="events")
    dlq_top = await redis.xrevrange(Keys.DLQ, count=1)
    mux = StreamMux(redis, block_ms=20)
    await mux.add(key, last_id="0-0")
    pipe = redis.pipeline(transaction=False)
    for fields in garbage:
        pipe.xadd(key, fields)
    await pipe.execute()
    try:
        async with asyncio.timeout(15):
            while not await _all_dead_lettered(redis, key, dlq_top, len(garbage)):
                assert await mux.read() == []
        new = label_values("voxbus_bus_rejected_total", "reason", kind="events") - before
        assert len(new) <= 15, f"{len(new)} new reason labels from {len(garbage)} entries, e.g. {sorted(new)[:4]}"
    finally:
        await _drop_dead_letters(redis, key, dlq_top)


async def _dead_letter_ids(redis: aioredis.Redis, source: str, dlq_top: list) -> list[bytes]:
    start = b"(" + dlq_top[0][0] if dlq_top else "-"
    return [
        dlq_id
        for dlq_id, fields in await redis.xrange(Keys.DLQ, min=start, max="+")
        if decode_dead_letter(fields[ENTRY_FIELD]).source == source
    ]


async def _all_dead_lettered(redis: aioredis.Redis, source: str, dlq_top: list, n: int) -> bool:
    return len(await _dead_letter_ids(redis, source, dlq_top)) >= n


async def _drop_dead_letters(redis: aioredis.Redis, source: str, dlq_top: list) -> None:
    ids = await _dead_letter_ids(redis, source, dlq_top)
    if ids:
        await redis.xdel(Keys.DLQ, *ids)
