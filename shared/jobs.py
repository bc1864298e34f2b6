"""Per-pool job queues: one Redis stream and one consumer group per pool.

A worker reads only as many new jobs as it has free slots, acks what it
finished, and reclaims jobs that another consumer held for too long
(`XAUTOCLAIM`). A job delivered more than `max_deliveries` times, or one that
cannot be decoded at all, moves to the pool's dead-letter stream with its
reason; the consumer keeps going.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import metrics
from .bus.entries import count_rejected, dead_letter
from .protocol import (
    ENTRY_FIELD,
    MAX_ENTRY_BYTES,
    STAGE_JOB,
    DeadLetter,
    Job,
    Keys,
    ProtocolError,
    RejectReason,
    decode_entry,
    encode,
    maxlen_for,
)
from .redis_conn import TRANSIENT_ERRORS

log = logging.getLogger("voxbus.jobs")


@dataclass(slots=True)
class Delivery:
    """One job as a worker received it: its stream entry, the job, and how many times it was delivered."""

    entry_id: str
    job: Job
    deliveries: int


async def enqueue(redis: aioredis.Redis, pool: str, job: Job) -> str:
    """Append a job to a pool's stream (bounded); returns the entry id."""
    key = Keys.pool_jobs(pool)
    entry_id = await redis.xadd(key, {ENTRY_FIELD: encode(job)}, maxlen=maxlen_for(key), approximate=True)
    metrics.BUS_PUBLISHED.labels("jobs").inc()
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


class JobQueue:
    """One consumer's view of a pool's job stream."""

    def __init__(
        self,
        redis: aioredis.Redis,
        pool: str,
        consumer: str,
        *,
        stage: str | None = None,
        max_deliveries: int = 3,
        claim_idle_ms: int = 5_000,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.consumer = consumer
        self.key = Keys.pool_jobs(pool)
        self.group = Keys.pool_group(pool)
        self.dlq = Keys.pool_dlq(pool)
        self.errors = Keys.pool_errors(pool)
        self.job_type = STAGE_JOB[stage] if stage else None
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self._claim_cursor = "0-0"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int = 1000) -> list[Delivery]:
        """Up to `count` new jobs (never more: callers pass their free slots)."""
        if count <= 0:
            return []
        try:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # stream or group vanished (Redis restarted without data)
            return []
        out: list[Delivery] = []
        streams = cast(list[tuple[Any, list[tuple[bytes, dict[bytes, bytes]]]]], reply or [])
        for _key, entries in streams:
            for entry_id, fields in entries:
                delivery = await self._parse(entry_id, fields, deliveries=1)
                if delivery:
                    out.append(delivery)
        return out

    async def reclaim(self, count: int, min_idle_ms: int | None = None) -> list[Delivery]:
        """Take over up to `count` jobs idle longer than `min_idle_ms` in other consumers' hands."""
        if count <= 0:
            return []
        try:
            reply = await self.redis.xautoclaim(
                self.key, self.group, self.consumer,
                min_idle_time=self.claim_idle_ms if min_idle_ms is None else min_idle_ms,
                start_id=self._claim_cursor, count=count,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            self._claim_cursor = "0-0"  # a new group: the old cursor points into a past PEL
            return []
        cursor, entries = reply[0], reply[1]  # Redis 7 adds a third element: deleted ids
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        return await self._take(entries)

    async def claim_from(self, consumer: str, count: int, min_idle_ms: int) -> list[Delivery]:
        """Take over up to `count` jobs pending at `consumer` (one the registry says is dead).

        `min_idle_ms` keeps two live workers from both taking the same job: the
        first XCLAIM resets the idle time, so the second finds nothing idle enough.
        """
        if count <= 0:
            return []
        rows = await self.redis.xpending_range(self.key, self.group, "-", "+", count, consumername=consumer)
        ids = [row["message_id"] for row in rows]
        if not ids:
            return []
        entries = await self.redis.xclaim(self.key, self.group, self.consumer, min_idle_time=min_idle_ms,
                                          message_ids=list(ids))
        return await self._take(entries)

    async def _take(self, entries: list[Any]) -> list[Delivery]:
        """Claimed entries -> deliveries; those over the delivery cap go to the DLQ."""
        entries = [(eid, fields) for eid, fields in entries if fields is not None]
        if not entries:
            return []
        counts = await self._delivery_counts([eid for eid, _ in entries])
        out: list[Delivery] = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            n = counts.get(eid)
            if n is None:
                # No longer pending: its previous holder acked it after XAUTOCLAIM handed it
                # to us. The job is done; dead-lettering it would report a success as a failure.
                continue
            if n > self.max_deliveries:
                reason = await self.redis.hget(self.errors, eid)
                last = f"; last error: {_text(reason)}" if reason else ""
                await self._dead_letter(eid, fields.get(ENTRY_FIELD, b""), f"exceeded {self.max_deliveries} deliveries{last}", n)
                continue
            metrics.JOBS_RECLAIMED.labels(self.pool).inc()
            delivery = await self._parse(entry_id, fields, deliveries=n)
            if delivery:
                out.append(delivery)
        return out

    async def ack(self, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.key, self.group, entry_id)
        pipe.hdel(self.errors, entry_id)
        await pipe.execute()

    async def fail(self, delivery: Delivery, reason: str) -> bool:
        """Record a failed attempt. Dead-letters the job once it used its deliveries.

        Returns True when the job went to the DLQ; otherwise it stays pending and
        is retried by whichever consumer reclaims it.
        """
        if delivery.deliveries >= self.max_deliveries:
            await self._dead_letter(
                delivery.entry_id, encode(delivery.job),
                f"failed {delivery.deliveries} times; last error: {reason}", delivery.deliveries,
            )
            return True
        await self.redis.hset(self.errors, delivery.entry_id, reason[:2000])
        return False

    async def reject(self, delivery: Delivery, why: RejectReason, reason: str) -> None:
        """Dead-letter a job that must not run at all (e.g. its session does not exist)."""
        count_rejected("jobs", why)
        await self._dead_letter(delivery.entry_id, encode(delivery.job), reason, delivery.deliveries)

    async def release(self, entry_id: str) -> None:
        """Hand a job back at once (graceful drain): make it claimable without waiting."""
        # A huge idle time makes the next XAUTOCLAIM of any consumer take it at once;
        # justid leaves the delivery count alone (handing back is not a failure).
        try:
            await self.redis.xclaim(
                self.key, self.group, Keys.RELEASED_CONSUMER, min_idle_time=0, message_ids=[entry_id], idle=10**9,
                justid=True
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):  # the group vanished (Redis restarted): nothing to hand back
                raise

    async def _delivery_counts(self, ids: list[Any]) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(self.key, self.group, min=eid, max=eid, count=1)
        counts: dict[str, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                mid = row["message_id"]
                counts[mid.decode() if isinstance(mid, bytes) else mid] = int(row["times_delivered"])
        return counts

    async def _parse(self, entry_id: bytes | str, fields: dict[bytes, bytes], deliveries: int) -> Delivery | None:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            job = decode_entry(fields)
            if self.job_type is not None and not isinstance(job, self.job_type):
                raise ProtocolError(f"{type(job).__name__} in a {self.job_type.__name__} pool", RejectReason.WRONG_TYPE)
            if not isinstance(job, tuple(STAGE_JOB.values())):
                raise ProtocolError(f"{type(job).__name__} is not a job", RejectReason.WRONG_TYPE)
        except ProtocolError as exc:
            count_rejected("jobs", exc.reason)
            payload = fields.get(ENTRY_FIELD) or b"".join(k + b"=" + v for k, v in fields.items())
            await self._dead_letter(eid, payload, f"malformed: {exc}", deliveries)
            return None
        return Delivery(eid, cast(Job, job), deliveries)

    async def _dead_letter(self, entry_id: str, payload: bytes, reason: str, deliveries: int) -> None:
        letter = DeadLetter(
            source=self.key, entry_id=entry_id, reason=reason, payload=payload[:MAX_ENTRY_BYTES], deliveries=deliveries
        )
        log.warning("dead-lettering job %s of pool %s: %s", entry_id, self.pool, reason[:200])
        for attempt in range(3):
            try:
                await dead_letter(self.redis, self.dlq, letter, self.pool)
                await self.ack(entry_id)
                return
            except TRANSIENT_ERRORS:
                if attempt == 2:
                    raise


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
