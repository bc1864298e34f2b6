"""`voxbus exporter`: queue depth per pool and Redis memory, read from Redis, as Prometheus metrics.

One process for the whole deployment (workers and bridges export their own
process metrics). Every `interval` seconds it reads, per pool: stream length,
consumer-group lag and pending count (Redis 6.2 and 7), oldest pending age,
head-of-line wait, DLQ length, and live workers / slots from the registry.

Memory (`collect_memory`): Redis `used_memory` and `maxmemory` per node (INFO),
and MEMORY USAGE of the four streams of the newest `--memory-sample` sessions
(default 200, pipelined: 800 commands a read) with the count of sessions
measured; the archive's backlog: sessions not archived yet, and how long ago
the oldest ended call among the first `--memory-sample` of them ended. INFO and
MEMORY are not in the minimal ACL (ops/redis/voxbus.acl): under it the
memory gauges stay unset and the exporter says so once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.config import Config

import argparse
import asyncio
import contextlib
import logging
import time

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
REDIS_USED_MEMORY = Gauge("voxbus_redis_used_memory_bytes", "Redis INFO used_memory, per node", ["node"])
REDIS_MAXMEMORY = Gauge("voxbus_redis_maxmemory_bytes", "Redis maxmemory, per node (0: no limit)", ["node"])
SESSION_STREAM_BYTES = Gauge("voxbus_session_streams_bytes",
                             "MEMORY USAGE of the streams of the sessions measured (the newest --memory-sample)")
SESSION_STREAMS_MEASURED = Gauge("voxbus_session_streams_measured",
                                 "Sessions whose streams were measured (of the newest --memory-sample, those in Redis)")
ARCHIVE_PENDING = Gauge("voxbus_archive_pending_sessions", "Sessions not archived yet (live calls included)")
ARCHIVE_OLDEST_ENDED = Gauge("voxbus_archive_oldest_ended_seconds",
                             "Since the end of the oldest ended call not archived yet (0: none)")
MEMORY_SAMPLE = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else redis://127.0.0.1:6379/0)")
    p.add_argument("--pools", help="pools TOML file: adds stage / gpu labels and pools with no worker yet")
    p.add_argument("--port", type=int, default=9108, help="port of /metrics (default 9108)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between reads of Redis")
    p.add_argument("--memory-sample", type=int, default=MEMORY_SAMPLE,
                   help=f"sessions whose streams' memory is measured, newest first (default {MEMORY_SAMPLE})")


async def collect_once(redis: aioredis.Redis, config: Config | None = None) -> list[dict[str, Any]]:
    """Read every pool's figures and set the gauges; returns them (for tests and `top`)."""
    from shared import registry
    from shared.protocol import Keys
    from shared.queue_stats import pool_stats

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


_NO_PERMISSION_LOGGED: set[str] = set()


async def collect_memory(redis: aioredis.Redis, sample: int = MEMORY_SAMPLE) -> dict[str, Any]:
    """Redis memory, the newest sessions' stream bytes and the archive backlog; sets the gauges, returns them."""
    from redis.exceptions import NoPermissionError, ResponseError

    from shared.admin.recording import recent_sessions
    from shared.protocol import Keys
    from shared.redis_conn import is_cluster

    out: dict[str, Any] = {}
    try:
        if is_cluster(redis):
            cluster: Any = redis
            per_node = await cluster.info("memory", target_nodes=cluster.PRIMARIES)
        else:
            kw = redis.connection_pool.connection_kwargs
            per_node = {f"{kw.get('host', kw.get('path', 'redis'))}:{kw.get('port', '')}".rstrip(":"): await redis.info("memory")}
        nodes = {node: (int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))) for node, info in per_node.items()}
        for node, (used, limit) in nodes.items():
            REDIS_USED_MEMORY.labels(node).set(used)
            REDIS_MAXMEMORY.labels(node).set(limit)
        out["nodes"] = nodes
    except (NoPermissionError, ResponseError) as exc:
        _once("info", "exporter: no Redis memory figures (INFO memory refused: %s)", exc)
    sids = [sid for sid, _ in await recent_sessions(redis, sample)]
    try:
        pipe = redis.pipeline(transaction=False)
        for sid in sids:
            for key in Keys.session_streams(sid):
                pipe.memory_usage(key)
        usage = await pipe.execute()
        per_session = [usage[i * 4:(i + 1) * 4] for i in range(len(sids))]
        measured = [sum(int(u) for u in four if u) for four in per_session if any(four)]
        SESSION_STREAM_BYTES.set(sum(measured))
        SESSION_STREAMS_MEASURED.set(len(measured))
        out["session_streams_bytes"], out["sessions_measured"] = sum(measured), len(measured)
    except (NoPermissionError, ResponseError) as exc:
        _once("memory", "exporter: no session stream memory (MEMORY USAGE refused: %s)", exc)
    pending = int(await redis.zcard(Keys.ARCHIVE_PENDING))
    ARCHIVE_PENDING.set(pending)
    oldest = 0.0
    if pending:
        first = [s.decode() if isinstance(s, bytes) else str(s) for s in await redis.zrange(Keys.ARCHIVE_PENDING, 0, sample - 1)]
        pipe = redis.pipeline(transaction=False)
        for sid in first:
            pipe.get(Keys.ended(sid))
        ends = [float(e) for e in await pipe.execute() if e is not None]
        oldest = max(0.0, time.time() - min(ends)) if ends else 0.0
    ARCHIVE_OLDEST_ENDED.set(oldest)
    out["archive_pending"], out["archive_oldest_ended_s"] = pending, oldest
    return out


def _once(key: str, msg: str, exc: Exception) -> None:
    if key not in _NO_PERMISSION_LOGGED:
        _NO_PERMISSION_LOGGED.add(key)
        log.warning(msg, exc)


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
            await collect_memory(redis, args.memory_sample)
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
