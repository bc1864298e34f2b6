"""`voxbus selfcheck`: prove the bus works against a real Redis, one line per check."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis to check (default: $REDIS_URL, else an embedded one)")
    p.add_argument("--sessions", type=int, default=20, help="simulated sessions (default 20)")
    p.add_argument("--frames", type=int, default=50, help="frames per session (default 50)")


async def _check(url: str, sessions: int, frames: int) -> list[tuple[str, bool, str]]:
    from redis.exceptions import NoPermissionError

    from ..bus import BatchPublisher, StreamMux
    from ..cancel import CancelHub, publish_cancel
    from ..jobs import JobQueue, enqueue
    from ..protocol import FRAME_BYTES, AsrJob, AudioFrame, Cancel, Keys
    from ..redis_conn import connect, redact_url, wait_ready

    results: list[tuple[str, bool, str]] = []
    redis = connect(url)
    try:
        await wait_ready(redis, 10, url)
        try:
            version = (await redis.info("server")).get("redis_version")
        except NoPermissionError:  # a least-privilege ACL user has no INFO (README "Redis ACL"): not needed
            version = "version not readable: no INFO permission"
        results.append(("redis", True, f"{redact_url(url)} (Redis {version})"))

        run = uuid.uuid4().hex[:8]
        sids = [f"selfcheck-{run}-{i}" for i in range(sessions)]
        mux = StreamMux(redis)
        for sid in sids:
            await mux.add(Keys.audio_in(sid))
        pub = BatchPublisher(redis)
        t0 = time.perf_counter()
        for seq in range(frames):
            await asyncio.gather(*(
                pub.publish(Keys.audio_in(sid), AudioFrame(session=sid, seq=seq, pcm=b"\0" * FRAME_BYTES))
                for sid in sids
            ))
        got = 0
        deadline = time.monotonic() + 5
        while got < sessions * frames and time.monotonic() < deadline:
            got += len(await mux.read())
        ms = (time.perf_counter() - t0) * 1000
        results.append(("streams", got == sessions * frames, f"{got}/{sessions * frames} frames through {sessions} streams in {ms:.0f} ms"))

        pool = f"selfcheck-{run}"
        q = JobQueue(redis, pool, "selfcheck", stage="asr")
        await q.ensure_group()
        await enqueue(redis, pool, AsrJob(session=sids[0], turn=0, start_seq=0, end_seq=frames - 1))
        await redis.xadd(Keys.pool_jobs(pool), {b"m": b"\xc1 not msgpack"})
        jobs = await q.read(count=5, block_ms=500)
        for d in jobs:
            await q.ack(d.entry_id)
        dlq = await redis.xlen(Keys.pool_dlq(pool))
        results.append(("jobs", len(jobs) == 1 and dlq == 1, f"{len(jobs)} job read and acked, {dlq} malformed entry dead-lettered"))

        hub = CancelHub(redis)
        await hub.start()
        w_a = await hub.watch(sids[0], 1)
        w_b = await hub.watch(sids[1], 1)
        t1 = time.perf_counter()
        await publish_cancel(redis, Cancel(session=sids[0], turn=1))
        try:
            await asyncio.wait_for(w_a.wait(), 2)
        except TimeoutError:
            pass
        cms = (time.perf_counter() - t1) * 1000
        results.append(("cancel", w_a.cancelled and not w_b.cancelled,
                        f"cancel reached its session in {cms:.1f} ms, other session untouched"))
        await hub.aclose()
        await pub.aclose()
        await mux.aclose()

        keys = [k for sid in sids for k in Keys.session_streams(sid)] + [Keys.cancelled_turn(s) for s in sids]
        keys += [Keys.pool_jobs(pool), Keys.pool_dlq(pool), Keys.pool_errors(pool)]
        for i in range(0, len(keys), 100):
            await redis.delete(*keys[i : i + 100])
    except Exception as exc:  # report, don't trace: this is a health check
        results.append(("error", False, f"{type(exc).__name__}: {exc}"))
    finally:
        await redis.aclose()
    return results


async def _main(args: argparse.Namespace) -> int:
    from .embedded_redis import redis_url_or_embedded

    async with redis_url_or_embedded(args.redis_url) as url:
        results = await _check(url, args.sessions, args.frames)
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name:8s} {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


def run(args: argparse.Namespace) -> int:
    code = asyncio.run(_main(args))
    sys.stdout.flush()
    return code
