"""Per-pool queue figures read from Redis: length, lag, pending, waits, DLQ size.

Works on Redis 7 (XINFO GROUPS reports `lag`) and on Redis 6.2 (no `lag`:
counted from the group's last-delivered id, up to `LAG_SCAN_LIMIT`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .protocol import Keys

LAG_SCAN_LIMIT = 10_000


@dataclass(slots=True)
class PoolStats:
    pool: str
    length: int = 0
    lag: int = 0  # entries not yet delivered to any consumer
    pending: int = 0  # delivered, not yet acked
    head_wait_ms: float = 0.0  # age of the oldest undelivered job
    # Idle time of the oldest unacked job. Workers reset the idle time of the jobs they run
    # at every heartbeat, so this grows only while nobody is running that job.
    oldest_pending_ms: float = 0.0
    dlq: int = 0
    consumers: int = 0


def _id_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def pool_stats(redis: aioredis.Redis, pool: str) -> PoolStats:
    key, group = Keys.pool_jobs(pool), Keys.pool_group(pool)
    stats = PoolStats(pool)
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(key)
    pipe.xlen(Keys.pool_dlq(pool))
    stats.length, stats.dlq = await pipe.execute()
    try:
        groups = await redis.xinfo_groups(key)
    except ResponseError:  # no such stream yet
        return stats
    info = next((g for g in groups if _s(g["name"]) == group), None)
    if info is None:
        return stats
    stats.pending = int(info["pending"])
    stats.consumers = int(info["consumers"])
    last = _s(info["last-delivered-id"])
    now_ms = time.time() * 1000
    head = cast(list[Any], await redis.xrange(key, f"({last}", "+", count=1))
    if head:
        stats.head_wait_ms = max(0.0, now_ms - _id_ms(head[0][0]))
    lag = info.get("lag")
    if lag is None:  # Redis 6.2, or a lag Redis 7 cannot compute after deletions
        later = cast(list[Any], await redis.xrange(key, f"({last}", "+", count=LAG_SCAN_LIMIT)) if head else []
        stats.lag = len(later)
    else:
        stats.lag = int(lag)
    if stats.pending:
        oldest = await redis.xpending_range(key, group, "-", "+", count=1)
        if oldest:
            stats.oldest_pending_ms = float(oldest[0]["time_since_delivered"])
    return stats
