"""Worker failure and shutdown with real processes: kill -9, SIGTERM drain, hand-back.

Every worker here is a `voxbus worker` subprocess running the deterministic
synthetic LLM engine, so an interrupted job re-run elsewhere must produce the
very text an uninterrupted run produces.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.protocol import Keys
from tests.support.workers import (
    complete_text,
    enqueue_llm,
    holder,
    pending_at,
    runs_of,
    start_session,
    tokens,
    total_pending,
    wait_final,
    wait_tokens,
)

pytestmark = pytest.mark.timeout(90)

STEP_MS = 40


async def test_kill_9_mid_job_completes_on_another_worker_without_duplicates_or_gaps(redis, cluster, uid):
    pool = cluster.pool("kill", slots=1, options={"step_ms": STEP_MS, "tokens": 25})
    a, b = await asyncio.gather(cluster.start(pool), cluster.start(pool))

    ref = f"ref-{uid}"
    await start_session(redis, ref)
    await enqueue_llm(redis, pool, ref)
    reference = complete_text(await wait_final(redis, ref))

    sid = f"kill-{uid}"
    await start_session(redis, sid)
    entry = await enqueue_llm(redis, pool, sid)
    await wait_tokens(redis, sid, 0, 5)
    victim, survivor = (a, b) if await holder(redis, pool, entry) == a.worker_id else (b, a)
    assert await holder(redis, pool, entry) == victim.worker_id
    victim.kill()
    written_before_kill = len(await tokens(redis, sid))

    text = complete_text(await wait_final(redis, sid, timeout=20))
    assert text == reference
    assert 5 <= written_before_kill < 25, "the kill did not land mid-job"
    assert await runs_of(redis, sid) == 2, "expected the killed run and one re-run"
    assert survivor.alive
    assert (await pending_at(redis, pool)).get(victim.worker_id, 0) == 0
    assert await total_pending(redis, pool) == 0


async def test_sigterm_lets_running_job_finish_then_deregisters(redis, cluster, uid):
    pool = cluster.pool("drain", slots=2, options={"step_ms": STEP_MS, "tokens": 25})
    worker = await cluster.start(pool, drain_timeout=8.0)
    sid = f"drain-{uid}"
    await start_session(redis, sid)
    await enqueue_llm(redis, pool, sid)
    await wait_tokens(redis, sid, 0, 3)

    worker.terminate()
    assert await worker.wait(timeout=10) == 0, worker.log_tail()

    complete_text(await tokens(redis, sid))  # finished before the process exited
    assert await runs_of(redis, sid) == 1
    assert not await redis.exists(Keys.worker(pool, worker.worker_id))
    assert await redis.zscore(Keys.pool_workers(pool), worker.worker_id) is None
    assert (await pending_at(redis, pool)).get(worker.worker_id, 0) == 0


async def test_sigterm_with_tiny_drain_timeout_hands_job_to_another_worker(redis, cluster, uid):
    pool = cluster.pool("handback", slots=1, options={"step_ms": STEP_MS, "tokens": 40})
    a, b = await asyncio.gather(cluster.start(pool, drain_timeout=0.1), cluster.start(pool, drain_timeout=0.1))
    sid = f"handback-{uid}"
    await start_session(redis, sid)
    entry = await enqueue_llm(redis, pool, sid)
    await wait_tokens(redis, sid, 0, 3)
    leaving, staying = (a, b) if await holder(redis, pool, entry) == a.worker_id else (b, a)

    leaving.terminate()
    assert await leaving.wait(timeout=10) == 0, leaving.log_tail()
    at_exit = await tokens(redis, sid)
    assert at_exit and not at_exit[-1].final, "the job should have been unfinished when its worker left"
    assert (await pending_at(redis, pool)).get(leaving.worker_id, 0) == 0

    toks = await wait_final(redis, sid, timeout=20)
    assert len(complete_text(toks).split()) == 40
    assert await runs_of(redis, sid) == 2
    assert staying.alive
    assert await total_pending(redis, pool) == 0
    assert await redis.xlen(Keys.pool_dlq(pool)) == 0


async def test_job_longer_than_claim_idle_is_not_taken_from_its_live_worker(redis, cluster, uid):
    # Without the runtime touching its running jobs, the peer's XAUTOCLAIM takes this
    # job after 300 ms, runs it a second time, and the third take dead-letters it.
    pool = cluster.pool("long", slots=1, claim_idle_ms=300, max_deliveries=2, options={"step_ms": 50, "tokens": 30})
    await asyncio.gather(cluster.start(pool), cluster.start(pool))
    sid = f"long-{uid}"
    await start_session(redis, sid)
    await enqueue_llm(redis, pool, sid)

    complete_text(await wait_final(redis, sid, timeout=20))
    assert await runs_of(redis, sid) == 1
    assert await redis.xlen(Keys.pool_dlq(pool)) == 0

