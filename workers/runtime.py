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

from shared import metrics
from shared.bus import BatchPublisher
from shared.cancel import CancelHub
from shared.logs import RateLimitedLog
from shared.tasks import TaskSet, finish_task
from shared.config import PoolConfig
from shared.jobs import Delivery, JobQueue
from shared.protocol import Cancelled, JobDropped, JobFailed, Keys, RejectReason, TurnMark, WorkerRecord
from shared.redis_conn import Backoff, connect, redact_url, wait_ready
from shared import registry
from workers.stages import Outcome, StageContext, StageHandler, create_handler

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
        job = d.job
        stage = self.pool.stage
        try:
            # A job for a session with neither a recording nor a context (forged, or long
            # expired) would burn its retries, or a TTS slot waiting for tokens: refuse it.
            if not await self.redis.exists(Keys.audio_in(job.session), Keys.ctx(job.session)):
                await self.queue.reject(d, RejectReason.UNKNOWN_SESSION,
                                        f"unknown session {job.session!r}: no recording and no context")
                metrics.JOBS.labels(*self._labels, "rejected").inc()
                return
            started = time.time()
            if job.deadline and started > job.deadline:
                # Overloaded: the caller has waited too long already; running it now would only make
                # the next caller wait too. The bridge tells this caller instead (busy, apology).
                late_ms = (started - job.deadline) * 1000
                await self.publisher.publish(Keys.events(job.session), JobDropped(
                    session=job.session, turn=job.turn, stage=stage, late_ms=round(late_ms, 1), pool=self.pool.name))
                await self.queue.ack(d.entry_id)
                metrics.JOBS.labels(*self._labels, "late").inc()
                self._limited.warning("late", "worker %s: dropped job %s, %.0f ms past its deadline (overloaded)",
                                      self.id, d.entry_id, late_ms)
                return
            if d.deliveries == 1:  # a retry's wait would measure the failure, not the queue
                wait_ms = max(0.0, (started - job.ts) * 1000)
                self._waits.append(wait_ms)
                metrics.STAGE_LATENCY_MS.labels(stage=stage, mark="queue_wait", pool=self.pool.name,
                                                gpu_type=self.pool.gpu_type).observe(wait_ms)
                self.publisher.publish_nowait(Keys.events(job.session), TurnMark(
                    session=job.session, turn=job.turn, stage=stage, mark="queue_wait", value_ms=wait_ms))
            watch = await self.hub.watch(job.session, job.turn)
            try:
                if watch.cancelled:
                    outcome = Outcome.CANCELLED
                    await self.publisher.publish(Keys.events(job.session), Cancelled(
                        session=job.session, turn=job.turn, stage=stage, reason="skipped: turn cancelled before start"))
                    metrics.JOBS.labels(*self._labels, "skipped").inc()
                else:
                    outcome = await self.handler.handle(job, watch)
                    if outcome is Outcome.CANCELLED and watch.cancel_ts:
                        metrics.BARGE_IN_STOP_MS.labels(*self._labels).observe(
                            max(0.0, (time.time() - watch.cancel_ts) * 1000))
            finally:
                self.hub.unwatch(watch)
            await self.queue.ack(d.entry_id)
            self.record.jobs_done += 1
            self._durations.append((time.time() - started) * 1000)
            metrics.JOBS.labels(*self._labels, outcome.value).inc()
        except asyncio.CancelledError:
            raise  # drain hands it back
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.exception("worker %s: job %s (%s turn %d) failed", self.id, d.entry_id, job.session, job.turn)
            metrics.JOBS.labels(*self._labels, "failed").inc()
            try:
                if not await self.queue.fail(d, reason):
                    metrics.JOBS.labels(*self._labels, "retried").inc()
                else:
                    metrics.JOBS.labels(*self._labels, "dead_lettered").inc()
                    await self.publisher.publish(Keys.events(job.session), JobFailed(
                        session=job.session, turn=job.turn, stage=stage, reason=reason[:500]))
            except Exception as exc:  # Redis down or refusing writes: the job stays pending, a peer retries it
                self._limited.warning("record-failure", "could not record the failure of %s (%s); it will be reclaimed",
                                      d.entry_id, exc)
        finally:
            self.running.pop(d.entry_id, None)
            metrics.SLOTS_BUSY.labels(*self._labels).set(len(self.running))
            self._slot_freed.set()

    def _update_percentiles(self) -> None:
        """Recent job durations and queue waits, for the registry (voxbus top, the exporter)."""
        if self._durations:
            d = sorted(self._durations)
            self.record.job_p50_ms = round(d[len(d) // 2], 1)
            self.record.job_p99_ms = round(d[min(len(d) - 1, int(len(d) * 0.99))], 1)
        if self._waits:
            w = sorted(self._waits)
            self.record.wait_p95_ms = round(w[min(len(w) - 1, int(len(w) * 0.95))], 1)

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
            ids = list(self.running)
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
