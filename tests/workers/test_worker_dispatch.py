"""Which worker runs what: dead-lettering, pools per GPU type, slots, overflow routing.

Real `voxbus worker` processes with the synthetic engine; the router runs in
this process against the same Redis, as the bridge would run it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.bus import BatchPublisher
from shared.config import load_config
from shared.jobs import JobQueue, enqueue
from shared.protocol import (
    JobDropped,
    JobFailed,
    Keys,
    LlmJob,
    TurnMark,
    decode_dead_letter,
    decode_entry,
    decode_worker,
)
from shared.routing import Router
from tests.support.polling import wait_until
from tests.support.workers import (
    complete_text,
    enqueue_llm,
    events,
    pending_at,
    start_session,
    tokens,
    total_pending,
    wait_final,
)

pytestmark = pytest.mark.timeout(90)


async def dead_letters(redis, pool: str):
    return [decode_dead_letter(fields[b"m"]) for _, fields in await redis.xrange(Keys.pool_dlq(pool))]


async def record(redis, pool: str, worker_id: str):
    return decode_worker(await redis.get(Keys.worker(pool, worker_id)))


async def test_poison_jobs_are_dead_lettered_with_reason_and_the_worker_keeps_serving(redis, cluster, uid):
    retry = {"max_deliveries": 2, "claim_idle_ms": 200}
    broken = cluster.pool("broken", options={"step_ms": 10, "tokens": 5, "fail_with": "engine exploded"}, **retry)
    healthy = cluster.pool("healthy", options={"step_ms": 10, "tokens": 5}, **retry)
    wb, wh = await asyncio.gather(cluster.start(broken), cluster.start(healthy))
    engine_fails, no_user, later = f"ef-{uid}", f"nu-{uid}", f"ok-{uid}"
    await start_session(redis, engine_fails)
    await start_session(redis, no_user, user_text=None)
    await start_session(redis, later)
    await enqueue_llm(redis, broken, engine_fails)
    await enqueue_llm(redis, healthy, no_user)

    for pool, sid, why in ((broken, engine_fails, "engine exploded"), (healthy, no_user, "no user message")):
        letters = await wait_until(lambda pool=pool: dead_letters(redis, pool), 15, f"a dead letter in {pool}")
        assert len(letters) == 1 and letters[0].deliveries == 2
        assert "failed 2 times" in letters[0].reason and why in letters[0].reason, letters[0].reason
        assert decode_entry({b"m": letters[0].payload}).session == sid
        async def job_failed(sid: str = sid) -> list[JobFailed]:  # written just after the dead letter
            return [e for e in await events(redis, sid) if isinstance(e, JobFailed)]

        failed = await wait_until(job_failed, 10, f"a JobFailed event of {sid}")
        assert len(failed) == 1 and failed[0].stage == "llm" and why in failed[0].reason
        assert await tokens(redis, sid) == []
        assert await total_pending(redis, pool) == 0

    await enqueue_llm(redis, healthy, later)
    complete_text(await wait_final(redis, later))
    assert wb.alive and wh.alive


async def test_pools_of_one_stage_on_different_gpu_types_get_only_their_own_jobs(redis, cluster, uid):
    pools = {
        gpu: cluster.pool(gpu, gpu_type=gpu, options={"step_ms": 10, "tokens": 3, "reply": f"served on {gpu}"})
        for gpu in ("gpua", "gpub")
    }
    workers = dict(zip(pools, await asyncio.gather(*(cluster.start(p) for p in pools.values()))))
    sessions = {gpu: [f"{gpu}{i}-{uid}" for i in range(3)] for gpu in pools}
    for gpu, sids in sessions.items():
        for sid in sids:
            await start_session(redis, sid)
            await enqueue_llm(redis, pools[gpu], sid)

    for gpu, sids in sessions.items():
        for sid in sids:
            assert complete_text(await wait_final(redis, sid)) == f"served on {gpu}"
    for gpu, pool in pools.items():
        wid = workers[gpu].worker_id
        assert set(await pending_at(redis, pool)) == {wid}, "another worker consumed from this pool"

        async def counted(pool: str = pool, wid: str = wid, gpu: str = gpu) -> bool:
            rec = await record(redis, pool, wid)
            return rec.jobs_done == 3 and rec.gpu_type == gpu

        await wait_until(counted, 5, f"the {gpu} worker's registry record to show 3 jobs")


async def test_slots_bound_concurrency_and_an_idle_worker_takes_the_waiting_jobs(redis, cluster, uid):
    pool = cluster.pool("slots", slots=2, options={"step_ms": 50, "tokens": 50})  # 2.5 s per job
    first = await cluster.start(pool)
    sids = [f"slot{i}-{uid}" for i in range(4)]
    for sid in sids:
        await start_session(redis, sid)
        await enqueue_llm(redis, pool, sid)

    most_held: dict[str, int] = {}
    sampling = True

    async def sample() -> None:
        while sampling:
            for name, n in (await pending_at(redis, pool)).items():
                most_held[name] = max(most_held.get(name, 0), n)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        async def running() -> list[str]:
            return [s for s in sids if await tokens(redis, s)]

        started = await wait_until(lambda: _at_least(running, 2), 10, "two jobs running")
        await asyncio.sleep(0.3)  # the first worker has had time to take more if it ever would
        assert len([s for s in sids if await tokens(redis, s)]) == 2
        second = await cluster.start(pool)
        done = {sid: await wait_final(redis, sid, timeout=20) for sid in sids}
    finally:
        sampling = False
        await sampler
    assert most_held[first.worker_id] == 2
    assert most_held[second.worker_id] == 2
    waited = [s for s in sids if s not in started]
    busy_until = min(done[s][-1].ts for s in started)
    for sid in waited:
        assert done[sid][0].ts < busy_until, "a waiting job did not start until the busy worker freed a slot"
    for worker in (first, second):
        await wait_until(
            lambda w=worker: _jobs_done(redis, pool, w.worker_id, 2), 5, f"{worker.worker_id} to have run 2 jobs"
        )


async def _at_least(check, n: int) -> list[str]:
    found = await check()
    return found if len(found) >= n else []


async def _jobs_done(redis, pool: str, worker_id: str, n: int) -> bool:
    return (await record(redis, pool, worker_id)).jobs_done == n


async def test_saturated_pool_overflows_to_its_fallback(redis, cluster, uid, counter):
    fallback = cluster.name("fallback")
    primary = cluster.pool("primary", slots=1, fallback=fallback, overflow_lag=1, options={"step_ms": 50, "tokens": 60})
    slow = cluster.pool("slow", fallback=fallback, overflow_wait_ms=400, options={"step_ms": 10, "tokens": 3})
    cluster.pool("fallback", options={"step_ms": 10, "tokens": 3, "reply": "from the fallback"})
    await asyncio.gather(cluster.start(primary), cluster.start(fallback))
    router = Router(redis, load_config(cluster.pools_file), stats_ttl_s=0.0)
    publisher = BatchPublisher(redis)
    metric = {"stage": "llm", "pool": primary, "fallback": fallback}
    before = counter("voxbus_overflow_total", **metric)
    routes = []
    try:
        for i in range(8):
            sid = f"ov{i}-{uid}"
            await start_session(redis, sid)
            route = await router.submit(publisher, "llm", LlmJob(session=sid, turn=0), override=primary)
            routes.append((sid, route))
            if route.pool != primary:
                break
            await asyncio.sleep(0.1)  # the primary worker takes what it has a slot for
    finally:
        await publisher.aclose()

    assert routes[0][1].pool == primary
    sid, route = routes[-1]
    assert route.pool == fallback and route.overflowed_from == primary and route.reason.startswith("lag "), routes
    assert counter("voxbus_overflow_total", **metric) == before + 1
    mark = [e for e in await events(redis, sid) if isinstance(e, TurnMark) and e.mark.startswith("overflow:")]
    assert [m.mark for m in mark] == [f"overflow:{primary}->{fallback}"]
    assert complete_text(await wait_final(redis, sid)) == "from the fallback"
    for other, _ in routes[:-1]:
        assert not [e for e in await events(redis, other) if isinstance(e, TurnMark) and e.mark.startswith("overflow:")]

    # The other bound: the oldest undelivered job of `slow` (no worker) has waited too long.
    await JobQueue(redis, slow, "nobody").ensure_group()
    await enqueue(redis, slow, LlmJob(session=f"wait-{uid}", turn=0))
    assert (await router.choose("llm", override=slow)).pool == slow
    await asyncio.sleep(0.6)
    route = await router.choose("llm", override=slow)
    assert route.pool == fallback and route.reason.startswith("queue wait"), route


async def test_no_overflow_to_a_fallback_without_live_workers(redis, cluster, uid, counter):
    """A saturated pool keeps its jobs when its fallback has no worker: they would wait there longer."""
    nobody = cluster.name("nobody")
    lonely = cluster.pool("lonely", fallback=nobody, overflow_wait_ms=100, options={"step_ms": 10, "tokens": 3})
    cluster.pool("nobody", options={"step_ms": 10, "tokens": 3})  # configured, never started
    router = Router(redis, load_config(cluster.pools_file), stats_ttl_s=0.0)
    metric = {"stage": "llm", "pool": lonely, "fallback": nobody}
    refused, overflowed = counter("voxbus_overflow_refused_total", **metric), counter("voxbus_overflow_total", **metric)
    await JobQueue(redis, lonely, "nobody").ensure_group()
    await enqueue(redis, lonely, LlmJob(session=f"lonely-{uid}", turn=0))
    await asyncio.sleep(0.3)  # head-of-line wait over the bound: saturated
    route = await router.choose("llm", override=lonely)
    assert (route.pool, route.overflowed_from) == (lonely, None)
    assert counter("voxbus_overflow_refused_total", **metric) == refused + 1
    assert counter("voxbus_overflow_total", **metric) == overflowed

    await cluster.start(nobody)  # once the fallback has a live worker, the overflow happens
    route = await router.choose("llm", override=lonely)
    assert route.pool == nobody and route.overflowed_from == lonely and route.reason.startswith("queue wait"), route


async def test_a_job_claimed_past_its_deadline_is_dropped_and_the_session_told(redis, cluster, uid):
    """Overload: a job that waited longer than its deadline is not run (that would only delay the next
    caller too); the session gets a JobDropped event, and the worker counts it."""
    pool = cluster.pool("late", options={"step_ms": 10, "tokens": 3})
    worker = await cluster.start(pool)
    late, fresh = f"late-{uid}", f"fresh-{uid}"
    await start_session(redis, late)
    await start_session(redis, fresh)
    await enqueue(redis, pool, LlmJob(session=late, turn=0, deadline=time.time() - 2.0))
    await enqueue(redis, pool, LlmJob(session=fresh, turn=0, deadline=time.time() + 30.0))
    complete_text(await wait_final(redis, fresh))
    dropped = await wait_until(lambda: _dropped(redis, late), 10, "a JobDropped event")
    assert dropped[0].stage == "llm" and dropped[0].late_ms >= 2000 and dropped[0].pool == pool
    assert await tokens(redis, late) == [] and await total_pending(redis, pool) == 0
    assert worker.alive


async def _dropped(redis, sid: str):
    return [e for e in await events(redis, sid) if isinstance(e, JobDropped)]
