"""Choosing a pool per stage: the session's choice, else the default, with overflow.

When the chosen pool's lag or head-of-line queue wait exceeds its configured
bound, new jobs go to its fallback pool; that is counted
(`voxbus_overflow_total`) and written to the session's events as a TurnMark.
The head-of-line wait (age of the oldest undelivered job) stands in for the
p95 queue wait: it is what the next job will at least wait, and it costs one
XRANGE instead of a histogram. A fallback pool without a live worker (the
registry's definition, `shared.registry`) is not overflowed to: the jobs would
only wait there longer. That is counted too (`voxbus_overflow_refused_total`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import registry
from .bus import BatchPublisher
from .config import Config, PoolConfig
from .metrics import JOBS_ENQUEUE_FAILED, OVERFLOWS, OVERFLOWS_REFUSED
from .protocol import Job, Keys, Stage, TurnMark
from .queue_stats import PoolStats, pool_stats

log = logging.getLogger("voxbus.routing")
T = TypeVar("T")


@dataclass(slots=True)
class Route:
    pool: str
    overflowed_from: str | None = None
    reason: str = ""


class Router:
    def __init__(self, redis: aioredis.Redis, config: Config, *, stats_ttl_s: float = 0.1) -> None:
        self.redis = redis
        self.config = config
        self.stats_ttl_s = stats_ttl_s
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}  # (what, pool) -> (when, value)

    async def _cached(self, what: str, pool: str, fetch: Callable[[], Awaitable[T]]) -> T:
        hit = self._cache.get((what, pool))
        if hit and time.monotonic() - hit[0] < self.stats_ttl_s:
            return cast(T, hit[1])
        value = await fetch()
        self._cache[(what, pool)] = (time.monotonic(), value)
        return value

    async def _stats_of(self, pool: str) -> PoolStats:
        return await self._cached("stats", pool, lambda: pool_stats(self.redis, pool))

    async def _live_workers(self, pool: str) -> int:
        return await self._cached("live", pool, lambda: registry.live_workers(self.redis, pool))

    @staticmethod
    def _saturation(pool: PoolConfig, stats: PoolStats) -> str:
        if pool.overflow_lag is not None and stats.lag > pool.overflow_lag:
            return f"lag {stats.lag} > {pool.overflow_lag}"
        if pool.overflow_wait_ms is not None and stats.head_wait_ms > pool.overflow_wait_ms:
            return f"queue wait {stats.head_wait_ms:.0f} ms > {pool.overflow_wait_ms:.0f} ms"
        return ""

    async def choose(self, stage: Stage, override: str | None = None) -> Route:
        pool = self.config.pool(override) if override else self.config.default_pool(stage)
        if pool.stage != stage:
            raise ValueError(f"pool {pool.name!r} serves {pool.stage!r}, not {stage!r}")
        seen = {pool.name}
        route = Route(pool.name)
        while pool.fallback and pool.fallback not in seen:
            reason = self._saturation(pool, await self._stats_of(pool.name))
            if not reason:
                break
            if not await self._live_workers(pool.fallback):
                OVERFLOWS_REFUSED.labels(stage, pool.name, pool.fallback).inc()
                break
            route = Route(pool.fallback, route.overflowed_from or pool.name, reason)
            OVERFLOWS.labels(stage, pool.name, pool.fallback).inc()
            pool = self.config.pool(pool.fallback)
            seen.add(pool.name)
        return route

    async def overloaded(self, max_wait_ms: float) -> str | None:
        """Why a new call should be refused now (a default pool's oldest queued job waited over
        `max_wait_ms`), or None. Cached like the overflow figures."""
        for stage in self.config.stages:
            if stage == "eot":
                continue  # a late verdict only falls back to the VAD timeout
            pool = self.config.default_pool(stage)
            try:
                stats = await self._stats_of(pool.name)
            except ResponseError as exc:  # figures we cannot read never keep a caller out
                log.warning("cannot read the queue of pool %s for admission: %s", pool.name, exc)
                continue
            if stats.head_wait_ms > max_wait_ms:
                return f"pool {pool.name} is {stats.head_wait_ms:.0f} ms behind (limit {max_wait_ms:.0f} ms)"
        return None

    async def submit(self, publisher: BatchPublisher, stage: Stage, job: Job, override: str | None = None) -> Route:
        """Route and enqueue `job` through the publisher, so that it lands after the frames
        published before it; returns once Redis has it, and raises if Redis refused it
        (e.g. out of memory). Connection errors do not raise: the publisher retries them."""
        route = await self.choose(stage, override)
        queued = [publisher.publish_nowait(Keys.pool_jobs(route.pool), job)]
        if route.overflowed_from:
            queued.append(publisher.publish_nowait(Keys.events(job.session), TurnMark(
                session=job.session, turn=job.turn, stage=stage, mark=f"overflow:{route.overflowed_from}->{route.pool}")))
        outcome = await asyncio.gather(*queued, return_exceptions=True)
        if len(outcome) > 1 and isinstance(outcome[1], Exception):
            log.warning("session %s: overflow mark not recorded: %s", job.session, outcome[1])
        if isinstance(outcome[0], BaseException):
            JOBS_ENQUEUE_FAILED.labels(stage, route.pool).inc()
            raise outcome[0]
        return route
