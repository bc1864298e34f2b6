"""The exporter keeps a pool's series when its workers go, and drops them when the pool moves.

A Prometheus gauge series is never updated again once the exporter writes
under other labels, so it would show its last value forever: a pool whose
workers all died must keep exporting under its stage / GPU type labels (with
0 workers, which is what the "no live workers" alert looks for), and a pool
redeployed on another GPU type must not leave its old series behind.
Real Redis; the registry entries are written the way workers write them.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from shared import registry
from shared.admin.exporter import collect_once
from shared.jobs import JobQueue, enqueue
from shared.protocol import Keys, LlmJob, WorkerRecord


def exported(pool: str) -> dict[tuple[str, str], float]:
    return {(s.labels["stage"], s.labels["gpu_type"]): s.value
            for f in REGISTRY.collect() for s in f.samples
            if s.name == "voxbus_pool_workers" and s.labels.get("pool") == pool}


async def test_series_survive_dead_workers_and_follow_a_move(redis: aioredis.Redis, uid: str) -> None:
    pool = f"llm-moving-{uid}"
    record = WorkerRecord(worker_id=f"w-{uid}", pool=pool, stage="llm", gpu_type="h100", host="h", pid=1, slots_total=2)
    try:
        await JobQueue(redis, pool, "nobody").ensure_group()
        await enqueue(redis, pool, LlmJob(session=f"s-{uid}", turn=0))  # work waits: the pool stays listed
        await registry.heartbeat(redis, record, ttl_s=30)
        await collect_once(redis)
        assert exported(pool) == {("llm", "h100"): 1}

        await registry.deregister(redis, pool, record.worker_id)  # every worker of the pool is gone
        row = {r["pool"]: r for r in await collect_once(redis)}[pool]
        assert (row["stage"], row["gpu_type"], row["workers"]) == ("llm", "h100", 0)
        assert exported(pool) == {("llm", "h100"): 0}

        record.gpu_type = "l4"  # redeployed elsewhere
        await registry.heartbeat(redis, record, ttl_s=30)
        await collect_once(redis)
        assert exported(pool) == {("llm", "l4"): 1}
    finally:
        await registry.deregister(redis, pool, record.worker_id)
        await redis.delete(Keys.pool_jobs(pool), Keys.pool_dlq(pool))
        await redis.srem(Keys.POOLS, pool)
