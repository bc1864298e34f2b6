"""`voxbus exporter`: queue depth per pool, read from Redis, as Prometheus metrics.

One process for the whole deployment (workers and bridges export their own
process metrics). Every `interval` seconds it reads, per pool: stream length,
consumer-group lag and pending count (Redis 6.2 and 7), oldest pending age,
head-of-line wait, DLQ length, and live workers / slots from the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from prometheus_client import Gauge

log = logging.getLogger("voxbus.exporter")

_L = ["pool", "stage", "gpu_type"]
POOL_LENGTH = Gauge("voxbus_pool_stream_length", "Entries in the pool's job stream", _L)
POOL_LAG = Gauge("voxbus_pool_lag", "Jobs not yet delivered to any worker", _L)
POOL_PENDING = Gauge("voxbus_pool_pending", "Jobs delivered but not acked", _L)
POOL_OLDEST_PENDING = Gauge("voxbus_pool_oldest_pending_seconds", "Idle time of the oldest unacked job", _L)
POOL_HEAD_WAIT = Gauge("voxbus_pool_head_wait_seconds", "Age of the oldest undelivered job", _L)
POOL_DLQ = Gauge("voxbus_pool_dlq_length", "Entries in the pool's dead-letter stream", _L)
POOL_WORKERS = Gauge("voxbus_pool_workers", "Live workers", _L)
POOL_SLOTS = Gauge("voxbus_pool_slots", "Job slots of live workers", [*_L, "state"])
POOL_JOB_P99 = Gauge("voxbus_pool_job_p99_ms", "Worst recent p99 job duration among live workers", _L)
GLOBAL_DLQ = Gauge("voxbus_dlq_length", "Entries rejected by non-group readers (bridge, replay)")
SESSIONS_KNOWN = Gauge("voxbus_sessions_recorded", "Sessions in the recent-sessions index")
SCRAPE_ERRORS = Gauge("voxbus_exporter_up", "1 when the last read of Redis succeeded")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else redis://127.0.0.1:6379/0)")
    p.add_argument("--pools", help="pools TOML file: adds stage / gpu labels and pools with no worker yet")
    p.add_argument("--port", type=int, default=9108, help="port of /metrics (default 9108)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between reads of Redis")


async def collect_once(redis, config=None) -> list[dict]:
    """Read every pool's figures and set the gauges; returns them (for tests and `top`)."""
    from shared.protocol import Keys
    from shared.queue_stats import pool_stats
    from shared import registry

    pools = set(await registry.known_pools(redis))
    labels: dict[str, tuple[str, str]] = {}
    if config is not None:
        for name, pc in config.pools.items():
            pools.add(name)
            labels[name] = (pc.stage, pc.gpu_type)
    rows = []
    for pool in sorted(pools):
        stats = await pool_stats(redis, pool)
        workers = await registry.worker_records(redis, pool)
        if workers and pool not in labels:
            labels[pool] = (workers[0].stage, workers[0].gpu_type)
        if pool not in labels and pool in _LABELS_SEEN:
            labels[pool] = _LABELS_SEEN[pool]  # its workers are gone: keep its series, do not start new ones
        if not workers and pool not in labels and not stats.length and not stats.dlq:
            continue  # a pool that once ran (e.g. a test) and left nothing behind
        stage, gpu = labels.get(pool, ("unknown", "unknown"))
        _relabel(pool, (stage, gpu))
        lv = (pool, stage, gpu)
        POOL_LENGTH.labels(*lv).set(stats.length)
        POOL_LAG.labels(*lv).set(stats.lag)
        POOL_PENDING.labels(*lv).set(stats.pending)
        POOL_OLDEST_PENDING.labels(*lv).set(stats.oldest_pending_ms / 1000)
        POOL_HEAD_WAIT.labels(*lv).set(stats.head_wait_ms / 1000)
        POOL_DLQ.labels(*lv).set(stats.dlq)
        POOL_WORKERS.labels(*lv).set(len(workers))
        busy = sum(w.slots_busy for w in workers)
        total = sum(w.slots_total for w in workers)
        POOL_SLOTS.labels(*lv, "busy").set(busy)
        POOL_SLOTS.labels(*lv, "total").set(total)
        p99 = max((w.job_p99_ms for w in workers), default=0.0)
        POOL_JOB_P99.labels(*lv).set(p99)
        rows.append({"pool": pool, "stage": stage, "gpu_type": gpu, "workers": len(workers), "slots_busy": busy,
                     "slots_total": total, "length": stats.length, "lag": stats.lag, "pending": stats.pending,
                     "oldest_pending_ms": stats.oldest_pending_ms, "head_wait_ms": stats.head_wait_ms, "dlq": stats.dlq,
                     "job_p50_ms": _median([w.job_p50_ms for w in workers]), "job_p99_ms": p99})
    GLOBAL_DLQ.set(await redis.xlen(Keys.DLQ))
    SESSIONS_KNOWN.set(await redis.zcard(Keys.SESSIONS))
    return rows


# Labels each pool's series were last exported with. A gauge series is never updated again
# once its labels change, so it would go on showing its last value: keep the labels of a
# pool whose workers have all gone, and drop the old series when a pool really moves.
_LABELS_SEEN: dict[str, tuple[str, str]] = {}
_POOL_GAUGES = (POOL_LENGTH, POOL_LAG, POOL_PENDING, POOL_OLDEST_PENDING, POOL_HEAD_WAIT, POOL_DLQ, POOL_WORKERS,
                POOL_JOB_P99)


def _relabel(pool: str, now: tuple[str, str]) -> None:
    before = _LABELS_SEEN.get(pool)
    if before is not None and before != now:
        for gauge in _POOL_GAUGES:
            with contextlib.suppress(KeyError):
                gauge.remove(pool, *before)
        for state in ("busy", "total"):
            with contextlib.suppress(KeyError):
                POOL_SLOTS.remove(pool, *before, state)
    _LABELS_SEEN[pool] = now


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v)
    return values[len(values) // 2] if values else 0.0


async def _main(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from shared.config import load_config
    from shared.redis_conn import TRANSIENT_ERRORS, connect, redact_url, redis_url_from_env

    url = args.redis_url or redis_url_from_env()
    config = load_config(args.pools) if args.pools else None
    redis = connect(url)
    start_http_server(args.port)
    log.info("exporter: reading %s every %.1fs, serving :%d/metrics", redact_url(url), args.interval, args.port)
    while True:
        try:
            await collect_once(redis, config)
            SCRAPE_ERRORS.set(1)
        except TRANSIENT_ERRORS as exc:
            SCRAPE_ERRORS.set(0)
            log.warning("exporter: Redis unreachable (%s)", exc)
        await asyncio.sleep(args.interval)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 0
