"""Per-pool job queues (shared/jobs.py) against a real Redis and real processes.

A consumer process killed with SIGKILL loses nothing: another consumer reclaims
its jobs. A job that keeps failing ends in the pool's DLQ with its reason while
the consumer carries on. 10,000 garbage entries never crash a consumer and each
one is dead-lettered and counted.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from shared.jobs import Delivery, JobQueue, enqueue
from shared.protocol import (
    ENTRY_FIELD,
    FRAME_BYTES,
    MAX_ENTRY_BYTES,
    AsrJob,
    AudioFrame,
    Keys,
    LlmJob,
    TokenChunk,
    decode,
    decode_dead_letter,
    encode,
)
from tests.support.prom import label_values

HELPER = Path(__file__).parent / "support" / "job_consumer.py"
REPO_ROOT = Path(__file__).resolve().parent.parent


def asr_job(sid: str, turn: int) -> AsrJob:
    return AsrJob(session=sid, turn=turn, start_seq=turn * 10, end_seq=turn * 10 + 9)


async def pending_count(redis: aioredis.Redis, pool: str) -> int:
    summary = await redis.xpending(Keys.pool_jobs(pool), Keys.pool_group(pool))
    return int(summary["pending"])


async def dead_letters(redis: aioredis.Redis, pool: str):
    return [(eid, decode_dead_letter(f[ENTRY_FIELD])) for eid, f in await redis.xrange(Keys.pool_dlq(pool))]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_jobs_of_a_sigkilled_consumer_process_are_reclaimed_and_acked(
    redis: aioredis.Redis, redis_url: str, uid: str
) -> None:
    pool, sid = f"kill-{uid}", f"s-{uid}"
    survivor = JobQueue(redis, pool, "survivor", stage="asr", claim_idle_ms=200)
    await survivor.ensure_group()
    enqueued = {await enqueue(redis, pool, asr_job(sid, turn)): turn for turn in range(8)}
    reclaimed_before = metric("voxbus_jobs_reclaimed_total", pool=pool)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HELPER), redis_url, pool, "doomed", "--hold", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )
    try:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        except TimeoutError:
            line = b""
        if not line:
            proc.kill()
            err = await proc.stderr.read()  # type: ignore[union-attr]
            raise AssertionError(f"consumer process never reported its jobs: {err.decode(errors='replace')[-2000:]}")
        held = json.loads(line)["held"]
        assert len(held) == 5 and set(held) <= set(enqueued)
        consumers = {c["name"]: c["pending"] for c in await redis.xinfo_consumers(Keys.pool_jobs(pool), pool)}
        assert consumers[b"doomed"] == 5
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == -signal.SIGKILL

    done: dict[str, Delivery] = {}
    for d in await survivor.read(count=10, block_ms=100):  # the 3 it never took
        assert d.deliveries == 1
        done[d.entry_id] = d
        await survivor.ack(d.entry_id)
    async with asyncio.timeout(15):
        while not set(held) <= set(done):
            for d in await survivor.reclaim(count=10):
                assert d.entry_id in held and d.deliveries == 2
                done[d.entry_id] = d
                await survivor.ack(d.entry_id)
            await asyncio.sleep(0.05)

    assert set(done) == set(enqueued)
    assert sorted(d.job.turn for d in done.values()) == list(range(8))
    assert await pending_count(redis, pool) == 0
    assert await redis.xlen(Keys.pool_dlq(pool)) == 0
    assert metric("voxbus_jobs_reclaimed_total", pool=pool) - reclaimed_before == 5


async def test_reclaim_waits_for_the_idle_time_and_release_hands_back_at_once(redis: aioredis.Redis, uid: str) -> None:
    pool, sid = f"idle-{uid}", f"s-{uid}"
    a = JobQueue(redis, pool, "a", stage="asr", claim_idle_ms=60_000)
    b = JobQueue(redis, pool, "b", stage="asr", claim_idle_ms=60_000)
    await a.ensure_group()
    await a.ensure_group()  # idempotent
    eid = await enqueue(redis, pool, asr_job(sid, 1))
    [d] = await a.read(count=5, block_ms=100)
    assert d.entry_id == eid
    assert await b.reclaim(count=5) == []  # a live holder keeps its job
    await a.release(eid)
    [taken] = await b.reclaim(count=5)
    assert taken.entry_id == eid and taken.job == d.job
    await b.ack(eid)
    assert await pending_count(redis, pool) == 0


async def test_read_never_returns_more_than_the_free_slots(redis: aioredis.Redis, uid: str) -> None:
    pool, sid = f"slots-{uid}", f"s-{uid}"
    q = JobQueue(redis, pool, "w", stage="asr")
    await q.ensure_group()
    for turn in range(10):
        await enqueue(redis, pool, asr_job(sid, turn))
    assert len(await q.read(count=3, block_ms=100)) == 3
    assert await q.read(count=0) == []
    assert await q.read(count=-1) == []
    rest = await q.read(count=100, block_ms=100)
    assert [d.job.turn for d in rest] == list(range(3, 10))


async def test_a_job_failing_max_deliveries_times_is_dead_lettered_and_the_next_jobs_run(
    redis: aioredis.Redis, uid: str
) -> None:
    pool, sid = f"fail-{uid}", f"s-{uid}"
    q = JobQueue(redis, pool, "w", stage="llm", max_deliveries=3)
    await q.ensure_group()
    poison = LlmJob(session=sid, turn=0, max_tokens=7)
    poison_id = await enqueue(redis, pool, poison)
    for turn in range(1, 5):
        await enqueue(redis, pool, LlmJob(session=sid, turn=turn))
    dead_before = metric("voxbus_bus_dead_lettered_total", queue=pool)

    [d] = await q.read(count=1, block_ms=100)
    assert (d.entry_id, d.deliveries) == (poison_id, 1)
    assert await q.fail(d, "engine exploded #1") is False
    assert await redis.hget(Keys.pool_errors(pool), poison_id) == b"engine exploded #1"
    for attempt in (2, 3):
        [d] = await q.reclaim(count=1, min_idle_ms=0)
        assert (d.entry_id, d.deliveries) == (poison_id, attempt)
        went_to_dlq = await q.fail(d, f"engine exploded #{attempt}")
        assert went_to_dlq is (attempt == 3)

    [(_, letter)] = await dead_letters(redis, pool)
    assert letter.source == Keys.pool_jobs(pool)
    assert letter.entry_id == poison_id
    assert letter.deliveries == 3
    assert "failed 3 times" in letter.reason and "engine exploded #3" in letter.reason
    assert decode(letter.payload) == poison
    assert await redis.hlen(Keys.pool_errors(pool)) == 0
    assert metric("voxbus_bus_dead_lettered_total", queue=pool) - dead_before == 1

    following = await q.read(count=10, block_ms=100)
    assert [x.job.turn for x in following] == [1, 2, 3, 4]
    for x in following:
        await q.ack(x.entry_id)
    assert await pending_count(redis, pool) == 0
    assert await q.reclaim(count=10, min_idle_ms=0) == []


async def test_a_job_reclaimed_past_its_deliveries_is_dead_lettered_with_the_last_error(
    redis: aioredis.Redis, uid: str
) -> None:
    pool, sid = f"crashy-{uid}", f"s-{uid}"
    queues = [JobQueue(redis, pool, f"w{i}", stage="asr", max_deliveries=2, claim_idle_ms=0) for i in range(3)]
    await queues[0].ensure_group()
    job = asr_job(sid, 5)
    eid = await enqueue(redis, pool, job)
    [d] = await queues[0].read(count=1, block_ms=100)
    await queues[0].fail(d, "CUDA out of memory")
    [d] = await queues[1].reclaim(count=1)  # second delivery; this consumer "dies" holding it
    assert d.deliveries == 2
    assert await queues[2].reclaim(count=1) == []  # third delivery exceeds the cap

    [(_, letter)] = await dead_letters(redis, pool)
    assert letter.entry_id == eid and letter.deliveries == 3
    assert letter.reason == "exceeded 2 deliveries; last error: CUDA out of memory"
    assert decode(letter.payload) == job
    assert await pending_count(redis, pool) == 0


async def test_a_job_acked_by_its_holder_while_being_reclaimed_is_not_dead_lettered(
    redis: aioredis.Redis, uid: str
) -> None:
    pool, sid = f"race-{uid}", f"s-{uid}"
    slow = JobQueue(redis, pool, "slow", stage="asr")
    thief = JobQueue(redis, pool, "thief", stage="asr")
    await slow.ensure_group()
    eid = await enqueue(redis, pool, asr_job(sid, 1))
    [d] = await slow.read(count=1, block_ms=100)
    real_counts = thief._delivery_counts

    async def holder_finishes_first(ids: list) -> dict[str, int]:
        await slow.ack(d.entry_id)  # lands between XAUTOCLAIM and the delivery-count lookup
        return await real_counts(ids)

    thief._delivery_counts = holder_finishes_first  # type: ignore[method-assign]
    assert await thief.reclaim(count=5, min_idle_ms=0) == []
    assert await redis.xlen(Keys.pool_dlq(pool)) == 0
    assert await pending_count(redis, pool) == 0
    assert eid == d.entry_id


async def test_queue_recovers_when_its_stream_and_group_vanish(redis: aioredis.Redis, uid: str) -> None:
    pool, sid = f"gone-{uid}", f"s-{uid}"
    q = JobQueue(redis, pool, "w", stage="asr")
    await q.ensure_group()
    old = await enqueue(redis, pool, asr_job(sid, 1))
    [d] = await q.read(count=1, block_ms=100)
    await redis.delete(Keys.pool_jobs(pool))  # what a restart without persistence looks like
    assert await q.read(count=1, block_ms=50) == []
    await q.ack(old)  # the job went with the group: acking or releasing it must not raise
    await redis.delete(Keys.pool_jobs(pool))
    await enqueue(redis, pool, asr_job(sid, 2))  # stream back, group not yet
    await q.release(d.entry_id)
    assert await q.reclaim(count=1, min_idle_ms=0) == []
    [d2] = await q.read(count=1, block_ms=100)
    assert d2.job.turn == 2


def job_garbage(rng: random.Random, sid: str, i: int) -> dict[bytes, bytes]:
    """One entry that an asr pool's consumer must reject."""
    valid = encode(asr_job(sid, i))
    choice = i % 10
    if choice == 0:
        return {ENTRY_FIELD: rng.randbytes(rng.randint(1, 300))}
    if choice == 1:
        return {ENTRY_FIELD: msgspec.msgpack.encode({"type": f"job.asr/{i + 2}", "session": sid, "turn": i, "start_seq": 0, "end_seq": 1})}
    if choice == 2:
        return {ENTRY_FIELD: valid[: rng.randint(0, len(valid) - 1)]}
    if choice == 3:
        return {b"job": valid}  # wrong field name
    if choice == 4:
        return {ENTRY_FIELD: valid, b"priority": b"high"}
    if choice == 5:
        return {ENTRY_FIELD: encode(LlmJob(session=sid, turn=i))}  # another stage's job
    if choice == 6:
        return {ENTRY_FIELD: encode(AudioFrame(session=sid, seq=i, pcm=bytes(FRAME_BYTES)))}  # not a job
    if choice == 7:
        return {ENTRY_FIELD: encode(TokenChunk(session=sid, turn=i, seq=0, text="x"))}
    if choice == 8:
        bad = {"type": "job.asr/1", "session": f"no spaces {i}!", "turn": i, "start_seq": 0, "end_seq": 1}
        return {ENTRY_FIELD: msgspec.msgpack.encode(bad)}
    return {ENTRY_FIELD: b""}


async def test_consumer_survives_10k_garbage_entries_and_delivers_every_valid_job(
    redis: aioredis.Redis, uid: str, counter: Callable[..., float]
) -> None:
    pool, sid = f"garbage-{uid}", f"s-{uid}"
    rng = random.Random(7)
    rows: list[tuple[dict[bytes, bytes], int | None]] = [(job_garbage(rng, sid, i), None) for i in range(10_000)]
    rows += [({ENTRY_FIELD: b"\x00" * (MAX_ENTRY_BYTES + 1 + n)}, None) for n in range(3)]  # oversized
    rows += [({ENTRY_FIELD: encode(asr_job(sid, turn))}, turn) for turn in range(600)]
    rng.shuffle(rows)
    garbage_total = sum(1 for _, turn in rows if turn is None)

    q = JobQueue(redis, pool, "w", stage="asr")
    await q.ensure_group()
    rejected_before = counter("voxbus_bus_rejected_total", kind="jobs")
    labels_before = label_values("voxbus_bus_rejected_total", "reason", kind="jobs")
    dead_before = metric("voxbus_bus_dead_lettered_total", queue=pool)
    garbage: dict[str, dict[bytes, bytes]] = {}
    for start in range(0, len(rows), 2000):
        chunk = rows[start : start + 2000]
        pipe = redis.pipeline(transaction=False)
        for fields, _ in chunk:
            pipe.xadd(Keys.pool_jobs(pool), fields)
        for (fields, turn), eid in zip(chunk, await pipe.execute()):
            if turn is None:
                garbage[eid.decode()] = fields

    delivered: list[int] = []
    async with asyncio.timeout(45):
        while len(delivered) < 600 or counter("voxbus_bus_rejected_total", kind="jobs") - rejected_before < garbage_total:
            for d in await q.read(count=64, block_ms=50):
                assert isinstance(d.job, AsrJob) and d.deliveries == 1
                delivered.append(d.job.turn)
                await q.ack(d.entry_id)
    assert await q.read(count=64, block_ms=50) == []

    assert sorted(delivered) == list(range(600))
    assert await pending_count(redis, pool) == 0
    letters = await dead_letters(redis, pool)
    assert len(letters) == garbage_total
    assert {letter.entry_id for _, letter in letters} == set(garbage)
    for _, letter in letters:
        assert letter.source == Keys.pool_jobs(pool)
        assert letter.reason.startswith("malformed: ")
        fields = garbage[letter.entry_id]
        if fields.get(ENTRY_FIELD):
            assert letter.payload == fields[ENTRY_FIELD][:MAX_ENTRY_BYTES]
    reasons = " ".join(letter.reason for _, letter in letters)
    assert "LlmJob in a AsrJob pool" in reasons and "AudioFrame in a AsrJob pool" in reasons and "exceeds" in reasons
    assert counter("voxbus_bus_rejected_total", kind="jobs") - rejected_before == garbage_total
    # Garbage quotes sizes, session ids and tags of its own choosing: none may become a label.
    new_labels = label_values("voxbus_bus_rejected_total", "reason", kind="jobs") - labels_before
    assert len(new_labels) <= 15, f"{len(new_labels)} reason labels, e.g. {sorted(new_labels)[:5]}"
    assert metric("voxbus_bus_dead_lettered_total", queue=pool) - dead_before == garbage_total
