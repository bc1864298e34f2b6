"""The worker runtime: one process serves one pool with a fixed number of slots.

- Claims new jobs only while a slot is free, and never more than the free
  slots, so an idle worker beside a busy one takes the work.
- Heartbeats into the registry; every `reap_interval_s` it takes over jobs
  pending at consumers that the registry says are dead (fast path, about
  `ttl_s` after a kill -9) and runs `XAUTOCLAIM` as the backstop. Each
  heartbeat also resets the idle time of the jobs it runs, so the backstop
  never takes a healthy job that merely runs longer than `claim_idle_ms`.
- Every running job holds a CancelWatch from the process's single pub/sub
  connection; a job whose turn was cancelled before it started is skipped.
- SIGTERM drains: stop claiming, let running jobs finish within a bound, hand
  the rest back to the pool at once, deregister.

Background tasks are stopped by events, and anything cancelled is cancelled
again until it ends: redis-py can swallow a cancellation that lands inside a
command (redis/redis-py#2028), and a single `task.cancel(); await task` then
hangs the shutdown for good.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
import uuid
from typing import Any

from redis.exceptions import ResponseError

from shared import metrics, registry, tracing
from shared.bus import BatchPublisher
from shared.cancel import CancelHub
from shared.config import PoolConfig
from shared.jobs import Delivery, JobQueue
from shared.logs import RateLimitedLog
from shared.protocol import JobOutcome, WorkerRecord
from shared.redis_conn import Backoff, connect, redact_url, wait_ready
from shared.stats import percentile
from shared.tasks import TaskSet, finish_task
from workers.job_exec import JobExecutor
from workers.stages import StageContext, StageHandler, create_handler

log = logging.getLogger("voxbus.worker")


def new_worker_id(pool: str) -> str:
    return f"{pool}-{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        redis_url: str,
        pool: PoolConfig,
        *,
        handler: StageHandler | None = None,
        engine: Any | None = None,
        heartbeat_s: float = registry.HEARTBEAT_S,
        ttl_s: float = registry.TTL_S,
        reap_interval_s: float = 0.25,
        drain_timeout_s: float = 10.0,
        worker_id: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.pool = pool
        self.id = worker_id or new_worker_id(pool.name)
        self._handler = handler
        self._engine = engine
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.reap_interval_s = reap_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.running: dict[str, tuple[asyncio.Task[None], Delivery]] = {}
        self.ready = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._durations: collections.deque[float] = collections.deque(maxlen=200)
        self._waits: collections.deque[float] = collections.deque(maxlen=200)
        self._beat_stop = asyncio.Event()
        # Held while touching running jobs and while handing jobs back, so a touch
        # in flight can never re-take a job that the drain has just released.
        self._touch_lock = asyncio.Lock()
        self._labels = (pool.name, pool.stage, pool.gpu_type)
        self.tasks = TaskSet("worker")
        self.failure: str | None = None  # why the worker stopped on its own (a vital task ended)
        self._beat_ok_since = 0.0
        self._beat_failing = False
        self._limited = RateLimitedLog(log)
        self.record = WorkerRecord(
            worker_id=self.id, pool=pool.name, stage=pool.stage, gpu_type=pool.gpu_type,
            host=socket.gethostname(), pid=os.getpid(), slots_total=pool.slots,
            model=str(pool.options.get("model", "")),
        )

    @property
    def free_slots(self) -> int:
        return self.pool.slots - len(self.running)

    async def run(self, stop: asyncio.Event) -> None:
        tracing.setup("voxbus-worker")  # off unless OTEL_EXPORTER_OTLP_ENDPOINT is set
        redis = connect(self.redis_url)
        await wait_ready(redis, 30, self.redis_url)
        self.redis = redis
        self.publisher = BatchPublisher(redis)
        self.hub = CancelHub(redis)
        self.queue = JobQueue(
            redis, self.pool.name, self.id, stage=self.pool.stage,
            max_deliveries=self.pool.max_deliveries, claim_idle_ms=self.pool.claim_idle_ms,
        )
        await self.queue.ensure_group()
        await self.hub.start()
        ctx = StageContext(redis, self.publisher, self.pool, self.id)
        handler = self._handler or create_handler(ctx, self._engine)
        log.info("worker %s: loading %s engine %r for pool %s", self.id, self.pool.stage, self.pool.engine, self.pool.name)
        t0 = time.perf_counter()
        await handler.load()
        self.handler = handler
        self.executor = JobExecutor(self.id, self.pool, self.queue, self.publisher, self.hub, handler, ctx)
        log.info("worker %s: ready in %.1fs (redis %s, %d slots)", self.id, time.perf_counter() - t0,
                 redact_url(self.redis_url), self.pool.slots)
        metrics.SLOTS_TOTAL.labels(*self._labels).set(self.pool.slots)
        await registry.heartbeat(redis, self.record, self.ttl_s)
        self._beat_ok_since = time.monotonic()
        self.tasks.spawn(self._heartbeats(), "heartbeat", vital=True)
        self.ready.set()
        try:
            claim = self.tasks.spawn(self._claim_loop(stop), "claim", vital=True)
            await _wait_any(stop, self.tasks.failed, timeout=None)
            if self.tasks.failed.is_set():
                self.failure = self.tasks.failure
            self.tasks.shutting_down()
            stop.set()
            await finish_task(claim, grace_s=self.reap_interval_s + 2.5)
        finally:
            await self._drain()
            self._beat_stop.set()
            await self.tasks.aclose(grace_s=self.heartbeat_s + 2.5)
            try:
                await registry.deregister(redis, self.pool.name, self.id)
            except Exception as exc:  # Redis unreachable or refusing writes
                log.warning("could not deregister %s (%s); its record expires by itself", self.id, exc)
            await handler.aclose()
            await finish_task(asyncio.ensure_future(self.hub.aclose()), grace_s=2.0)
            await finish_task(asyncio.ensure_future(self.publisher.aclose()), grace_s=5.0)
            await redis.aclose()
            log.info("worker %s: stopped", self.id)

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        """Claims jobs until `stop`; any Redis error (a lost connection, OOM, a vanished group) backs off
        and goes on: this loop ending would leave the process alive but deaf."""
        backoff = Backoff(cap=1.0)
        next_reap = 0.0
        block_ms = max(10, int(self.reap_interval_s * 1000))
        while not stop.is_set():
            try:
                if self.free_slots <= 0:
                    self._slot_freed.clear()
                    await _wait_any(self._slot_freed, stop, timeout=self.reap_interval_s)
                    continue
                if time.monotonic() >= next_reap and self._may_reclaim():
                    next_reap = time.monotonic() + self.reap_interval_s
                    for d in await self._reclaim(self.free_slots):
                        self._start(d)
                if self.free_slots > 0 and not stop.is_set():
                    for d in await self.queue.read(self.free_slots, block_ms=block_ms):
                        self._start(d)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.BUS_RECONNECTS.labels("worker").inc()
                self._limited.warning(f"claim:{type(exc).__name__}", "worker %s: claiming jobs failed (%s: %s); retrying",
                                      self.id, type(exc).__name__, exc)
                await backoff.sleep()

    def _may_reclaim(self) -> bool:
        """Not while our own heartbeats fail, nor right after: Redis is (or was) down or refusing
        writes for everyone, so every peer looks dead until its next beat, and XCLAIM still works
        under OOM (it adds no memory): taking their running jobs would run them twice. Two
        heartbeat lifetimes after we are back, every live peer has beaten again."""
        return not self._beat_failing and time.monotonic() - self._beat_ok_since >= 2 * self.ttl_s

    async def _reclaim(self, free: int) -> list[Delivery]:
        """Jobs of dead consumers first (registry), then anything idle too long (XAUTOCLAIM)."""
        out: list[Delivery] = []
        live = await registry.live_worker_ids(self.redis, self.pool.name, self.ttl_s)
        try:
            consumers = await self.redis.xinfo_consumers(self.queue.key, self.queue.group)
        except ResponseError as exc:
            # The stream or group vanished (Redis restarted without data): recreate it, nothing to take.
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc).lower():
                raise
            await self.queue.ensure_group()
            return out
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name == self.id or name in live:
                continue
            if int(c["pending"]) == 0:
                if int(c["idle"]) > 60_000:
                    await self.redis.xgroup_delconsumer(self.queue.key, self.queue.group, name)
                continue
            taken = await self.queue.claim_from(name, free - len(out), min_idle_ms=int(self.ttl_s * 500))
            if taken:
                log.warning("worker %s: took over %d job(s) of dead consumer %s", self.id, len(taken), name)
            out += taken
            if len(out) >= free:
                return out
        out += await self.queue.reclaim(free - len(out))
        return out

    def _start(self, d: Delivery) -> None:
        if d.entry_id in self.running:
            return  # our own running job came back through XAUTOCLAIM: never run it twice here
        task = asyncio.create_task(self._execute(d), name=f"job-{d.entry_id}")
        self.running[d.entry_id] = (task, d)
        metrics.SLOTS_BUSY.labels(*self._labels).set(len(self.running))

    async def _execute(self, d: Delivery) -> None:
        try:
            result = await self.executor.execute(d)
            if result.outcome in (JobOutcome.DONE, JobOutcome.CANCELLED, JobOutcome.SKIPPED):
                self.record.jobs_done += 1
                self._durations.append((result.ended - result.started) * 1000)
            if result.wait_ms is not None:
                self._waits.append(result.wait_ms)
        finally:
            self.running.pop(d.entry_id, None)
            metrics.SLOTS_BUSY.labels(*self._labels).set(len(self.running))
            self._slot_freed.set()

    def _update_percentiles(self) -> None:
        """Recent job durations and queue waits, for the registry (voxbus top, the exporter)."""
        if self._durations:
            self.record.job_p50_ms = percentile(self._durations, 50, digits=1) or 0.0
            self.record.job_p99_ms = percentile(self._durations, 99, digits=1) or 0.0
        if self._waits:
            self.record.wait_p95_ms = percentile(self._waits, 95, digits=1) or 0.0

    async def _heartbeats(self) -> None:
        """Beats until stopped, whatever Redis answers: a lost connection, OOM (maxmemory with
        noeviction refuses the writes), a read-only replica. A beat that fails is retried soon
        (jittered, capped well under the record's TTL) and logged at most once per interval."""
        backoff = Backoff(base=0.05, cap=max(0.1, self.ttl_s / 4))
        while not self._beat_stop.is_set():
            try:
                self.record.slots_busy = len(self.running)
                self._update_percentiles()
                await registry.heartbeat(self.redis, self.record, self.ttl_s)
                await self._touch_running()
                backoff.reset()
                if self._beat_failing:
                    self._beat_failing = False
                    self._beat_ok_since = time.monotonic()
                    log.info("worker %s: heartbeats are back", self.id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._beat_failing = True
                metrics.HEARTBEAT_FAILURES.labels(self.pool.name).inc()
                self._limited.warning(f"beat:{type(exc).__name__}", "worker %s: heartbeat failed (%s: %s); retrying",
                                      self.id, type(exc).__name__, exc)
                await backoff.sleep()
                continue
            try:
                await asyncio.wait_for(self._beat_stop.wait(), timeout=self.heartbeat_s)
            except TimeoutError:
                pass

    async def _touch_running(self) -> None:
        """Reset the idle time of the jobs running here (XCLAIM JUSTID: delivery count unchanged).

        XAUTOCLAIM takes any entry idle longer than `claim_idle_ms`, and an entry's
        idle time counts from its delivery: without this, a healthy job running
        longer than that is taken by a peer, run twice, and after `max_deliveries`
        such takeovers dead-lettered while it is still running.
        """
        async with self._touch_lock:
            ids: list[Any] = list(self.running)
            if ids:
                await self.redis.xclaim(
                    self.queue.key, self.queue.group, self.id, min_idle_time=0, message_ids=ids, justid=True
                )

    async def _drain(self) -> None:
        if not self.running:
            return
        tasks = [t for t, _ in self.running.values()]
        log.info("worker %s: draining %d running job(s) (up to %.0fs)", self.id, len(tasks), self.drain_timeout_s)
        await asyncio.wait(tasks, timeout=self.drain_timeout_s)
        leftover = list(self.running.values())
        for task, _ in leftover:
            await finish_task(task, grace_s=0.0)
        async with self._touch_lock:
            for _, d in leftover:
                try:
                    await self.queue.release(d.entry_id)
                    metrics.JOBS.labels(*self._labels, "released").inc()
                except Exception as exc:
                    log.warning("could not hand back %s (%s); it will be reclaimed after claim_idle_ms", d.entry_id, exc)
        self.running.clear()


async def _wait_any(event: asyncio.Event, stop: asyncio.Event, timeout: float | None) -> None:
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
