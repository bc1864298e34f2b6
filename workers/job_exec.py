"""Running one delivery of a job, from claim to ack, and saying what became of it.

The worker runtime (`workers.runtime`) decides *when* a job runs; this decides
*how*: refuse it for an unknown session, drop it past its deadline, skip it if
its turn was cancelled, hand it to the stage, ack it, or record a failure
(retry or dead letter). Whatever happens, a `JobRun` event in the session's
events says who ran it, when it was queued, picked up and finished, and how it
ended (`voxbus inspect` reads these), and with tracing on, `<stage>.queue` and
`<stage>.run` spans join the bridge's trace of the turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from shared import metrics, tracing
from shared.bus import BatchPublisher
from shared.cancel import CancelHub
from shared.config import PoolConfig
from shared.jobs import Delivery, JobQueue
from shared.logs import RateLimitedLog
from shared.protocol import Cancelled, JobDropped, JobFailed, JobOutcome, JobRun, Keys, RejectReason, TurnMark
from workers.stages import StageContext, StageHandler

log = logging.getLogger("voxbus.worker")


@dataclass(slots=True)
class JobResult:
    outcome: JobOutcome
    started: float
    ended: float
    wait_ms: float | None = None  # queue wait of a first delivery that ran (None: not measured)


class JobExecutor:
    def __init__(self, worker_id: str, pool: PoolConfig, queue: JobQueue, publisher: BatchPublisher, hub: CancelHub,
                 handler: StageHandler, ctx: StageContext) -> None:
        self.worker_id = worker_id
        self.pool = pool
        self.queue = queue
        self.publisher = publisher
        self.hub = hub
        self.handler = handler
        self.ctx = ctx
        self._labels = (pool.name, pool.stage, pool.gpu_type)
        self._limited = RateLimitedLog(log)

    async def execute(self, d: Delivery) -> JobResult:
        """Run `d` to its end; raises only CancelledError (the drain hands the job back)."""
        job = d.job
        started = time.time()
        span = None
        if tracing.tracer() is not None and (parent := tracing.parent_context(job.trace)) is not None:
            if d.deliveries == 1:
                tracing.span_between(f"{self.pool.stage}.queue", parent, job.ts, started, self._attrs(job))
            span = tracing.start_span(f"{self.pool.stage}.run", parent, started,
                                      {**self._attrs(job), "voxbus.deliveries": d.deliveries})
            if span is not None:
                self.ctx.spans[id(job)] = span
        reason = ""
        wait_ms: float | None = None
        try:
            outcome, wait_ms = await self._run(d, started)
        except asyncio.CancelledError:
            if span is not None:
                span.set_attribute("voxbus.outcome", "handed_back")
                span.end()
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.exception("worker %s: job %s (%s turn %d) failed", self.worker_id, d.entry_id, job.session, job.turn)
            outcome = await self._failed(d, reason)
        finally:
            self.ctx.spans.pop(id(job), None)
        ended = time.time()
        if span is not None:
            span.set_attribute("voxbus.outcome", outcome.value)
            if reason:
                span.set_attribute("voxbus.error", reason[:200])
            span.end(end_time=tracing.ns(ended))
        if outcome is not JobOutcome.REJECTED:  # an unknown session gets no keys written for it
            self.publisher.publish_nowait(Keys.events(job.session), JobRun(
                session=job.session, turn=job.turn, stage=self.pool.stage, pool=self.pool.name,
                gpu_type=self.pool.gpu_type, worker=self.worker_id, entry_id=d.entry_id, queued=job.ts,
                started=started, ended=ended, outcome=outcome, deliveries=d.deliveries, reason=reason[:500],
                trace=job.trace))
        return JobResult(outcome, started, ended, wait_ms)

    def _attrs(self, job: object) -> dict[str, str | int]:
        return {"voxbus.session": getattr(job, "session", ""), "voxbus.turn": getattr(job, "turn", -1),
                "voxbus.pool": self.pool.name, "voxbus.gpu_type": self.pool.gpu_type, "voxbus.worker": self.worker_id}

    async def _run(self, d: Delivery, started: float) -> tuple[JobOutcome, float | None]:
        job = d.job
        stage = self.pool.stage
        # A job for a session with neither a recording nor a context (forged, or long
        # expired) would burn its retries, or a TTS slot waiting for tokens: refuse it.
        if not await self.queue.redis.exists(Keys.audio_in(job.session), Keys.ctx(job.session)):
            await self.queue.reject(d, RejectReason.UNKNOWN_SESSION, f"unknown session {job.session!r}: no recording and no context")
            metrics.JOBS.labels(*self._labels, "rejected").inc()
            return JobOutcome.REJECTED, None
        if job.deadline and started > job.deadline:
            # Overloaded: the caller has waited too long already; running it now would only make
            # the next caller wait too. The bridge tells this caller instead (busy, apology).
            late_ms = (started - job.deadline) * 1000
            await self.publisher.publish(Keys.events(job.session), JobDropped(
                session=job.session, turn=job.turn, stage=stage, late_ms=round(late_ms, 1), pool=self.pool.name))
            await self.queue.ack(d.entry_id)
            metrics.JOBS.labels(*self._labels, "late").inc()
            self._limited.warning("late", "worker %s: dropped job %s, %.0f ms past its deadline (overloaded)",
                                  self.worker_id, d.entry_id, late_ms)
            return JobOutcome.LATE, None
        wait_ms = None
        if d.deliveries == 1:  # a retry's wait would measure the failure, not the queue
            wait_ms = max(0.0, (started - job.ts) * 1000)
            metrics.STAGE_LATENCY_MS.labels(stage=stage, mark="queue_wait", pool=self.pool.name,
                                            gpu_type=self.pool.gpu_type).observe(wait_ms)
            self.publisher.publish_nowait(Keys.events(job.session), TurnMark(
                session=job.session, turn=job.turn, stage=stage, mark="queue_wait", value_ms=wait_ms))
        watch = await self.hub.watch(job.session, job.turn)
        try:
            if watch.cancelled:
                outcome = JobOutcome.SKIPPED
                await self.publisher.publish(Keys.events(job.session), Cancelled(
                    session=job.session, turn=job.turn, stage=stage, reason="skipped: turn cancelled before start"))
            else:
                outcome = await self.handler.handle(job, watch)
                if outcome is JobOutcome.CANCELLED and watch.cancel_ts:
                    metrics.BARGE_IN_STOP_MS.labels(*self._labels).observe(max(0.0, (time.time() - watch.cancel_ts) * 1000))
        finally:
            self.hub.unwatch(watch)
        await self.queue.ack(d.entry_id)
        metrics.JOBS.labels(*self._labels, outcome.value).inc()
        return outcome, wait_ms

    async def _failed(self, d: Delivery, reason: str) -> JobOutcome:
        """Record a failure: retried later, or dead-lettered on its last try."""
        job = d.job
        metrics.JOBS.labels(*self._labels, "failed").inc()
        try:
            if not await self.queue.fail(d, reason):
                metrics.JOBS.labels(*self._labels, "retried").inc()
                return JobOutcome.RETRIED
            metrics.JOBS.labels(*self._labels, "dead_lettered").inc()
            await self.publisher.publish(Keys.events(job.session), JobFailed(
                session=job.session, turn=job.turn, stage=self.pool.stage, reason=reason[:500]))
            return JobOutcome.DEAD_LETTERED
        except Exception as exc:  # Redis down or refusing writes: the job stays pending, a peer retries it
            self._limited.warning("record-failure", "could not record the failure of %s (%s); it will be reclaimed",
                                  d.entry_id, exc)
            return JobOutcome.RETRIED
