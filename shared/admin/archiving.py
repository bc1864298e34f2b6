"""Archiving calls: each ended call's recording goes to the archive once, even when its bridge died.

A bridge that closes a call sets `Keys.ended` and schedules `archive_session`;
every bridge with an archive also runs `sweep` every SWEEP_INTERVAL_S, and
`voxbus archive --sweep` does the same on demand. `archive_session` is
crash-safe and runs once per call:

1. done already (`Keys.archived` set)? nothing to do;
2. take the session's lock (`SET NX EX`, LOCK_TTL_S): another archiver holds it? leave it;
3. export from Redis, compress and put it (in a thread), under the session id;
4. set `Keys.archived` and EXPIRE every key of the session to `retention_s`
   (one transaction), drop it from `Keys.ARCHIVE_PENDING` and list it in
   `Keys.ARCHIVE_EXPIRING` for `reap` to delete its keys when `retention_s` is up.

Why delete what expires anyway: Redis reclaims expired keys lazily, or by an
active cycle that only keeps stale keys under ~10 % of all keys with a TTL,
and every call leaves a 30-day claim (bridge/core.py CLAIM_TTL_S). Among
20,000 claims, 256 of 300 expired 100 kB streams were still in memory 12 s
after their TTL (Redis 7.0; none among 0 claims): recordings would linger in
proportion to the calls of the last month. `reap` runs with every sweep tick
(REAP_INTERVAL_S) and DELetes them; the TTL stays as the backstop.

A crash between 3 and 4 leaves the lock to expire and the session pending:
the next sweep writes the same object again (same name, same content), so
the archive never holds two copies. Until step 4 the keys keep the 24 h TTL
their bridge gave them at the end, which is how long archiving may keep failing
(S3 down) before anything is lost; `voxbus_archive_sessions_total{outcome="failed"}`
and the exporter's `voxbus_archive_oldest_ended_seconds` alert long before.

Which calls a sweep archives: the sessions of `Keys.ARCHIVE_PENDING` (bridges
with an archive add every call they open) that ended ENDED_GRACE_S ago or
more (their own bridge archives them first), or that are orphaned: the bridge
named by their claim has no heartbeat (`Keys.bridge`, refreshed every
HEARTBEAT_S, expiring after HEARTBEAT_TTL_S) and no caller audio came for
ORPHAN_AFTER_S. The audio check keeps a live call safe from a sweeper whatever
happens to its bridge's heartbeat (a Redis refusing writes, an older bridge
that sends none). A call without caller audio for STALE_AFTER_S is over
whatever its bridge says (bridges end silent calls after 2 minutes).

A live call archived on demand (`voxbus archive SESSION`) is a snapshot: it is
put, but nothing is marked or expired, and the end of the call replaces it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import metrics
from ..logs import RateLimitedLog
from ..protocol import AudioFrame, Keys, OpusFrame, ProtocolError, decode_as
from ..redis_conn import xrevrange
from .archive import Archive, ArchiveError
from .recording import RecordingError, dumps, export_session, summarize_recording

if TYPE_CHECKING:
    from ..tasks import TaskSet

log = logging.getLogger("voxbus.archive")
_limited = RateLimitedLog(log)

LOCK_TTL_S = 120  # renewed before the upload; a crashed archiver's lock frees itself after this
SWEEP_INTERVAL_S = 30.0
ORPHAN_AFTER_S = 60.0  # no heartbeat of its bridge and no caller audio this long: the call is over
ENDED_GRACE_S = 30.0  # an ended call is left to its own bridge this long
# No caller audio this long ends any call (bridges end silent calls after idle_timeout_s, 120 s by
# default), even one whose bridge still beats: a session its bridge failed to open or to close.
STALE_AFTER_S = 3600.0
HEARTBEAT_S = 2.0
SETTLE_S = 2.0  # a call that just ended is archived this much later: the outputs still in flight land first
HEARTBEAT_TTL_S = 10.0
SWEEP_PAGE = 500  # sessions looked at per round trip
REAP_INTERVAL_S = 5.0


class Outcome(enum.StrEnum):
    ARCHIVED = "archived"  # an ended call, written, marked and expiring
    SNAPSHOT = "snapshot"  # a live call, written only
    EMPTY = "empty"  # nothing recorded (or expired already): nothing written
    FAILED = "failed"  # the export or the upload failed: retried by the next sweep
    DONE_BEFORE = "done_before"  # archived already
    BUSY = "busy"  # another archiver holds the session


@dataclass
class ArchiveResult:
    session: str
    outcome: Outcome
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""


async def archive_session(redis: aioredis.Redis, archive: Archive, sid: str, *, retention_s: float, who: str,
                          final: bool = True) -> ArchiveResult:
    """Archive one session (the module docstring's steps); `final=False`: a live call's snapshot."""
    if final and await redis.exists(Keys.archived(sid)):
        return ArchiveResult(sid, Outcome.DONE_BEFORE)
    lock = Keys.archive_lock(sid)
    if not await redis.set(lock, who, nx=True, ex=LOCK_TTL_S):
        return ArchiveResult(sid, Outcome.BUSY)
    t0 = time.perf_counter()
    try:
        if final and await redis.exists(Keys.archived(sid)):  # finished by another between the check and the lock
            return ArchiveResult(sid, Outcome.DONE_BEFORE)
        try:
            rec = await export_session(redis, sid)
        except RecordingError:
            if final:
                await _retire(redis, sid, retention_s, None)
            metrics.ARCHIVED.labels(Outcome.EMPTY).inc()
            return ArchiveResult(sid, Outcome.EMPTY)
        summary = summarize_recording(rec)
        await redis.expire(lock, LOCK_TTL_S)  # the upload gets the whole lock time
        size = await asyncio.to_thread(_pack_and_put, archive, rec, summary)
        if final:
            mark = json.dumps({"url": archive.url, "at": round(time.time(), 3), "by": who, "bytes": size})
            await _retire(redis, sid, retention_s, mark)
        outcome = Outcome.ARCHIVED if final else Outcome.SNAPSHOT
        took = time.perf_counter() - t0
        metrics.ARCHIVED.labels(outcome).inc()
        metrics.ARCHIVE_BYTES.inc(size)
        metrics.ARCHIVE_SECONDS.observe(took)
        log.info("session %s: %s to %s (%.0f KiB, %.2f s)", sid, outcome, archive.url, size / 1024, took)
        return ArchiveResult(sid, outcome, size, took)
    except Exception as exc:
        metrics.ARCHIVED.labels(Outcome.FAILED).inc()
        if isinstance(exc, ArchiveError | OSError | RedisError):
            _limited.warning("archive-failed", "session %s: archiving failed (retried by the next sweep): %s", sid, exc)
        else:  # a bug: with its traceback, once in a while
            _limited.exception("archive-bug", "session %s: archiving failed (retried by the next sweep)", sid)
        return ArchiveResult(sid, Outcome.FAILED, seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
    finally:
        await _release(redis, lock, who)


def _pack_and_put(archive: Archive, rec: Any, summary: dict[str, Any]) -> int:
    data = dumps(rec)
    archive.put(rec.session, data, summary)
    return len(data)


async def _retire(redis: aioredis.Redis, sid: str, retention_s: float, mark: str | None) -> None:
    """The archive has the call (`mark`), or there is nothing to archive: its keys expire after `retention_s`."""
    ttl = max(1, round(retention_s))
    # All or nothing (one slot: the keys share the session's hash tag): a Redis out of memory refuses
    # the SETs, and then no key may start expiring either; the call may still be live behind the OOM.
    tx = redis.pipeline(transaction=True)
    if mark is not None:
        tx.set(Keys.archived(sid), mark, ex=ttl)
    tx.set(Keys.ended(sid), f"{time.time():.3f}", ex=ttl, nx=True)  # an orphan never got its end marked
    for key in Keys.session_keys(sid):
        tx.expire(key, ttl)
    await tx.execute()
    pipe = redis.pipeline(transaction=False)
    pipe.zrem(Keys.ARCHIVE_PENDING, sid)
    pipe.zadd(Keys.ARCHIVE_EXPIRING, {sid: time.time() + ttl})
    await pipe.execute()


async def _release(redis: aioredis.Redis, lock: str, who: str) -> None:
    try:
        if _text(await redis.get(lock)) == who:
            await redis.delete(lock)
    except Exception as exc:  # the lock expires by itself: a failed release only delays a retry
        _limited.warning("archive-unlock", "could not release %s: %s", lock, exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


# ---------------------------------------------------------------------------------- which calls are over

async def last_activity(redis: aioredis.Redis, sid: str, started: float) -> float:
    """When the call last showed life: its newest caller frame, else its start."""
    try:
        newest = await xrevrange(redis, Keys.audio_in(sid), count=1)
        if newest:
            return max(started, float(decode_as(newest[0][1][b"m"], AudioFrame, OpusFrame).ts))
    except (ProtocolError, KeyError):
        pass
    return started


async def due_sessions(redis: aioredis.Redis, *, now: float | None = None, orphan_after_s: float = ORPHAN_AFTER_S,
                       ended_grace_s: float = ENDED_GRACE_S) -> list[str]:
    """Pending sessions that are due: ended (`ended_grace_s` ago) or orphaned, oldest first."""
    now = time.time() if now is None else now
    due: list[str] = []
    start = 0
    while True:
        rows = cast(list[tuple[bytes, float]],
                    await redis.zrange(Keys.ARCHIVE_PENDING, start, start + SWEEP_PAGE - 1, withscores=True))
        if not rows:
            return due
        start += len(rows)
        sids = [(_text(s), float(score)) for s, score in rows]
        pipe = redis.pipeline(transaction=False)
        for sid, _ in sids:
            pipe.exists(Keys.archived(sid))
            pipe.get(Keys.ended(sid))
            pipe.get(Keys.claim(sid))
        found = await pipe.execute()
        owners = {_text(found[i * 3 + 2]) for i in range(len(sids))} - {""}
        alive = await _alive_bridges(redis, owners)
        for i, (sid, started) in enumerate(sids):
            archived, ended, owner = found[i * 3], found[i * 3 + 1], _text(found[i * 3 + 2])
            if archived:
                due.append(sid)  # archived, but the pending entry survived a crash: the next step clears it
            elif ended is not None:
                if now - _float(ended) >= ended_grace_s or owner not in alive:
                    due.append(sid)
            elif owner not in alive or now - started >= STALE_AFTER_S:
                silent = now - await last_activity(redis, sid, started)
                if silent >= (orphan_after_s if owner not in alive else STALE_AFTER_S):
                    due.append(sid)


def _float(value: Any) -> float:
    try:
        return float(_text(value))
    except ValueError:
        return 0.0


async def _alive_bridges(redis: aioredis.Redis, owners: set[str]) -> set[str]:
    ordered = sorted(owners)
    if not ordered:
        return set()
    pipe = redis.pipeline(transaction=False)
    for owner in ordered:
        pipe.exists(Keys.bridge(owner))
    return {o for o, there in zip(ordered, await pipe.execute()) if there}


async def reap(redis: aioredis.Redis, *, now: float | None = None, limit: int = SWEEP_PAGE) -> int:
    """DEL the keys of archived sessions whose retention is up (see the module docstring); returns how many sessions."""
    now = time.time() if now is None else now
    rows = await redis.zrangebyscore(Keys.ARCHIVE_EXPIRING, "-inf", now, start=0, num=limit)
    sids = [_text(s) for s in rows]
    if not sids:
        return 0
    pipe = redis.pipeline(transaction=False)
    for sid in sids:
        pipe.delete(*Keys.session_keys(sid))  # one slot per session: a cluster takes the multi-key DEL
    pipe.zrem(Keys.ARCHIVE_EXPIRING, *sids)
    await pipe.execute()
    return len(sids)


async def sweep(redis: aioredis.Redis, archive: Archive, *, retention_s: float, who: str, now: float | None = None,
                orphan_after_s: float = ORPHAN_AFTER_S, ended_grace_s: float = ENDED_GRACE_S,
                concurrency: int = 2) -> list[ArchiveResult]:
    """Delete what is past its retention (`reap`), then archive every due session (`due_sessions`),
    `concurrency` at a time."""
    while await reap(redis, now=now) == SWEEP_PAGE:
        pass
    due = await due_sessions(redis, now=now, orphan_after_s=orphan_after_s, ended_grace_s=ended_grace_s)
    gate = asyncio.Semaphore(concurrency)

    async def one(sid: str) -> ArchiveResult:
        async with gate:
            if await redis.exists(Keys.archived(sid)):
                await redis.zrem(Keys.ARCHIVE_PENDING, sid)
                return ArchiveResult(sid, Outcome.DONE_BEFORE)
            return await archive_session(redis, archive, sid, retention_s=retention_s, who=who)

    return list(await asyncio.gather(*(one(sid) for sid in due)))


# ---------------------------------------------------------------------------------- in the bridge

async def heartbeat_loop(redis: aioredis.Redis, bridge_id: str, interval_s: float = HEARTBEAT_S,
                         ttl_s: float = HEARTBEAT_TTL_S) -> None:
    """The bridge's liveness for the sweepers: its key lives `ttl_s` past its last beat."""
    key = Keys.bridge(bridge_id)
    while True:
        try:
            await redis.set(key, f"{time.time():.3f}", px=int(ttl_s * 1000))
        except Exception as exc:  # a vital loop: survive any Redis error
            _limited.warning("bridge-heartbeat", "bridge heartbeat failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)


class Archiver:
    """A bridge's archiving: each call it closes, at most `concurrency` at a time, and a periodic sweep."""

    def __init__(self, redis: aioredis.Redis, archive: Archive, *, retention_s: float, who: str, tasks: TaskSet,
                 concurrency: int = 2, sweep_interval_s: float = SWEEP_INTERVAL_S, settle_s: float = SETTLE_S) -> None:
        self.redis = redis
        self.archive = archive
        self.retention_s = retention_s
        self.who = who
        self.tasks = tasks
        self.sweep_interval_s = sweep_interval_s
        self.settle_s = settle_s
        self._gate = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[Any]] = set()

    def schedule(self, sid: str) -> None:
        """Archive a call that just ended, in the background."""
        task = self.tasks.spawn(self._one(sid), "archive")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _one(self, sid: str) -> None:
        await asyncio.sleep(self.settle_s)
        async with self._gate:
            await archive_session(self.redis, self.archive, sid, retention_s=self.retention_s, who=self.who)

    async def drain(self, timeout_s: float) -> None:
        """Let the calls being archived finish (a clean shutdown); what is left, a sweep does later."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)

    async def sweep_loop(self) -> None:
        # Jittered, so that the bridges of a fleet do not all sweep at once.
        next_sweep = time.monotonic() + self.sweep_interval_s * random.uniform(0.5, 1.5)
        while True:
            await asyncio.sleep(min(REAP_INTERVAL_S, self.sweep_interval_s) * random.uniform(0.8, 1.2))
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_interval_s * random.uniform(0.5, 1.5)
                    await sweep(self.redis, self.archive, retention_s=self.retention_s, who=self.who, concurrency=1)
                else:
                    await reap(self.redis)
            except Exception as exc:  # a vital loop: survive anything, try again next round
                _limited.warning("archive-sweep", "archive sweep failed: %s: %s", type(exc).__name__, exc)


async def call_is_over(redis: aioredis.Redis, sid: str, orphan_after_s: float = ORPHAN_AFTER_S) -> bool:
    """Ended, or orphaned (its bridge has no heartbeat and its caller has been silent `orphan_after_s`)."""
    ended, owner = await redis.get(Keys.ended(sid)), _text(await redis.get(Keys.claim(sid)))
    if ended is not None:
        return True
    if owner and await redis.exists(Keys.bridge(owner)):
        return False
    started = await redis.zscore(Keys.SESSIONS, sid)
    return time.time() - await last_activity(redis, sid, float(started or 0.0)) >= orphan_after_s
