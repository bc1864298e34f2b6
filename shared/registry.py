"""Worker registry: who serves which pool, with heartbeats that expire when a worker dies.

Each pool has a sorted set (worker id -> last heartbeat), which makes "is this
consumer alive?" one ZSCORE and lets a peer reclaim a dead worker's jobs
within about `ttl` seconds of its death; each worker also has a record (its
slots, model, GPU type) under a key that expires on its own. Worker records
carry no hash tag, so on a Redis Cluster they spread over the slots and are
read with one MGET per slot.
"""

from __future__ import annotations

import time
from typing import cast

import redis.asyncio as aioredis

from .protocol import Keys, ProtocolError, WorkerRecord, decode_worker, encode
from .redis_conn import mget

HEARTBEAT_S = 0.25  # how often a worker beats
# The one definition of a live worker: its last heartbeat is at most this old. A worker silent for
# longer is dead: its record expires, peers take over its jobs, routing and `voxbus top` skip it.
TTL_S = 1.0


async def heartbeat(redis: aioredis.Redis, rec: WorkerRecord, ttl_s: float) -> None:
    rec.heartbeat = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(Keys.pool_workers(rec.pool), {rec.worker_id: rec.heartbeat})
    pipe.set(Keys.worker(rec.pool, rec.worker_id), encode(rec), px=int(ttl_s * 1000))
    pipe.sadd(Keys.POOLS, rec.pool)
    await pipe.execute()


async def deregister(redis: aioredis.Redis, pool: str, worker_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.zrem(Keys.pool_workers(pool), worker_id)
    pipe.delete(Keys.worker(pool, worker_id))
    await pipe.execute()


async def live_worker_ids(redis: aioredis.Redis, pool: str, ttl_s: float = TTL_S) -> set[str]:
    cutoff = time.time() - ttl_s
    ids = cast(list[bytes | str], await redis.zrangebyscore(Keys.pool_workers(pool), cutoff, "+inf"))
    # forget workers dead for a long time so the set stays small
    await redis.zremrangebyscore(Keys.pool_workers(pool), "-inf", cutoff - 3600)
    return {i.decode() if isinstance(i, bytes) else i for i in ids}


async def live_workers(redis: aioredis.Redis, pool: str, ttl_s: float = TTL_S) -> int:
    """How many workers of `pool` are live (one ZCOUNT)."""
    return int(await redis.zcount(Keys.pool_workers(pool), time.time() - ttl_s, "+inf"))


async def worker_records(redis: aioredis.Redis, pool: str) -> list[WorkerRecord]:
    """Records of the live workers of `pool` (expired ones are gone)."""
    ids = cast(list[bytes | str], await redis.zrange(Keys.pool_workers(pool), 0, -1))
    if not ids:
        return []
    raw = await mget(redis, [Keys.worker(pool, i.decode() if isinstance(i, bytes) else i) for i in ids])
    out: list[WorkerRecord] = []
    for data in raw:
        if data is None:
            continue
        try:
            out.append(decode_worker(data))
        except ProtocolError:
            continue
    return out


async def known_pools(redis: aioredis.Redis) -> list[str]:
    return sorted(p.decode() if isinstance(p, bytes) else p for p in await redis.smembers(Keys.POOLS))
