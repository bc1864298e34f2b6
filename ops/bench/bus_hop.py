"""Benchmark of one bus hop: bridge publish of a 20 ms audio frame to worker receipt.

N simulated sessions each publish one AudioFrame (640 bytes PCM) every 20 ms,
with a random phase per session, through `BatchPublisher` (explicit frame ids)
into `Keys.audio_in(sid)`; one `StreamMux` over all N streams receives them.
Publisher (the bridge) and consumer (a worker) run as two separate OS
processes, as they do in production. Every frame's publish call and receipt
(after decoding and validation) are stamped with `time.perf_counter()`
(CLOCK_MONOTONIC on Linux, so the two processes' stamps compare) and matched
by (session, seq) after the run.

Pacing is real time and never skips: a frame is published at its due time or,
if the publisher is behind, as soon as it can be; `late_frames` and
`sessions_behind` count frames published more than one 20 ms period late, and
`due_to_receipt_p99_ms` includes that lag. `lost` is frames Redis acknowledged
that the consumer had not received `drain_s` after the last publish. Both
processes warm up (connection, first entry) and freeze the start-up heap out of
the garbage collector before the clock starts; nothing after that is excluded.
CPU shares are per process (100% = one core); `cpu_others_pct` is what the rest
of the machine used meanwhile, the noise under the figures on a shared host.

The anchor is measured in the same run on the same Redis: Celery 5 with the
Redis broker (its own db number and key prefix), apply_async to task body
start, one task at a time, against a real `celery worker --pool=solo`
subprocess. The figure and its anchor come out in one report.

    .venv/bin/python ops/bench/bus_hop.py --sessions 100 --seconds 5 --json

Every key the benchmark creates is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from procstats import cpu_seconds, emit, machine_jiffies, receive_from

from shared.stats import percentile

FRAME_S = 0.020
DEFAULT_URL = "redis://127.0.0.1:6379/0"
CELERY_DB = 14
CELERY_TASK = "voxbus_bench.stamp"
PROCESS_MODEL = "separate processes: publisher (bridge role) and consumer (worker role), Redis over loopback TCP"
CELERY_ANCHOR = "apply_async -> task body start, one task at a time, `celery worker --pool=solo` subprocess, Redis broker"


# --------------------------------------------------------------------------
# Run description shared by the orchestrator and both child processes
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HopSpec:
    url: str
    run_id: str
    sessions: int
    seconds: float
    seed: int
    block_ms: int
    count: int
    shard_size: int
    drain_s: float = 5.0

    @property
    def frames_per_session(self) -> int:
        return max(1, round(self.seconds / FRAME_S))

    def session_ids(self) -> list[str]:
        return [f"hop{self.run_id}-{i}" for i in range(self.sessions)]

    @property
    def warm_session(self) -> str:
        return f"hop{self.run_id}-warm"

    @property
    def warm_key(self) -> str:
        """Where the publisher's warm-up entry goes, before the clock starts."""
        from shared.protocol import Keys

        return Keys.events(self.warm_session)

    def keys(self) -> list[str]:
        from shared.protocol import Keys

        return [Keys.audio_in(sid) for sid in self.session_ids()]


def _settle_heap() -> None:
    """Collect once and freeze what start-up left (imports, schedules) out of later collections.

    Without it the first full collection, a few hundred frames in, walks every
    object the imports made: a ~10 ms pause that is start-up, not steady state.
    A long-running bridge or worker can do the same once it is set up.
    """
    gc.collect()
    gc.freeze()




# --------------------------------------------------------------------------
# Publisher process (the bridge)
# --------------------------------------------------------------------------


@dataclass(slots=True)
class PublishLog:
    """Per-frame stamps of the publisher, indexed [session, seq]."""

    call: np.ndarray
    ack: np.ndarray
    due: np.ndarray
    failed: int = 0
    duplicates: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    redis_cpu_s: float = 0.0
    machine_busy: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)




async def _redis_cpu(redis: Any) -> float:
    """CPU seconds the Redis server has used (all its clients, not only ours)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _on_ack(log: PublishLog, i: int, seq: int, fut: asyncio.Future) -> None:
    if fut.cancelled() or fut.exception() is not None:
        log.failed += 1
    elif fut.result() is None:
        log.duplicates += 1
    else:
        log.ack[i, seq] = time.perf_counter()


def _schedule(spec: HopSpec, start: float) -> tuple[list[tuple[float, int]], np.ndarray]:
    """Sessions ordered by their random phase within the 20 ms tick, and every frame's due time."""
    rng = random.Random(spec.seed)
    phases = np.array([rng.uniform(0.0, FRAME_S) for _ in range(spec.sessions)])
    ticks = np.arange(spec.frames_per_session) * FRAME_S
    due = start + phases[:, None] + ticks[None, :]
    order = sorted((float(p), i) for i, p in enumerate(phases))
    return order, due


async def _publish_frames(spec: HopSpec) -> PublishLog:
    from shared.bus import BatchPublisher
    from shared.protocol import FRAME_BYTES, AudioFrame, TurnMark, frame_entry_id
    from shared.redis_conn import connect, wait_ready

    redis = connect(spec.url)
    await wait_ready(redis, 10, spec.url)
    pub = BatchPublisher(redis)
    sids, keys = spec.session_ids(), spec.keys()
    pcm = os.urandom(FRAME_BYTES)
    # Warm up (publisher task, its connection, the thread the counters use) before the clock starts.
    await pub.publish(spec.warm_key, TurnMark(session=spec.warm_session, turn=0, stage="bench", mark="warm"))
    order, due = _schedule(spec, time.perf_counter() + 0.2)
    shape = (spec.sessions, spec.frames_per_session)
    log = PublishLog(call=np.full(shape, np.nan), ack=np.full(shape, np.nan), due=due)
    redis_cpu0 = await _redis_cpu(redis)
    machine0 = await asyncio.to_thread(machine_jiffies)
    _settle_heap()
    cpu0 = cpu_seconds()
    await asyncio.sleep(max(0.0, float(due.min()) - time.perf_counter()))
    wall0 = time.perf_counter()
    for seq in range(spec.frames_per_session):
        entry_id = frame_entry_id(seq)
        for _, i in order:
            delay = due[i, seq] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            log.call[i, seq] = time.perf_counter()
            fut = pub.publish_nowait(keys[i], AudioFrame(session=sids[i], seq=seq, pcm=pcm), entry_id=entry_id)
            fut.add_done_callback(partial(_on_ack, log, i, seq))
    await pub.flush()
    await asyncio.sleep(0)  # let the last done-callbacks run
    log.cpu_s, log.wall_s = cpu_seconds() - cpu0, time.perf_counter() - wall0
    log.redis_cpu_s = await _redis_cpu(redis) - redis_cpu0
    machine1 = await asyncio.to_thread(machine_jiffies)
    busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
    log.machine_busy = busy / total if total else 0.0
    log.stats = _batch_stats(pub)
    await pub.aclose()
    await redis.aclose()
    return log


def _batch_stats(pub: Any) -> dict[str, Any]:
    """The publisher's batch counters; empty for bus versions without them, so before/after compare."""
    stats = getattr(pub, "stats", None)
    return dict(stats()) if callable(stats) else {}


def _publisher_main(spec: HopSpec, conn: Connection) -> None:
    conn.send(asyncio.run(_publish_frames(spec)))
    conn.close()


# --------------------------------------------------------------------------
# Consumer process (a worker)
# --------------------------------------------------------------------------


@dataclass(slots=True)
class ReceiveLog:
    recv: np.ndarray
    rounds: int = 0
    empty_rounds: int = 0
    max_round: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0


async def _receive_frames(spec: HopSpec, conn: Connection) -> ReceiveLog:
    from shared.bus import StreamMux
    from shared.redis_conn import connect, wait_ready

    redis = connect(spec.url)
    await wait_ready(redis, 10, spec.url)
    mux = StreamMux(redis, block_ms=spec.block_ms, count=spec.count, shard_size=spec.shard_size)
    keys = spec.keys()
    for key in keys:
        await mux.add(key, "0-0")  # fresh keys: follow from the very first entry
    index = {key: i for i, key in enumerate(keys)}
    log = ReceiveLog(recv=np.full((spec.sessions, spec.frames_per_session), np.nan))
    expected, got, stopping = log.recv.size, 0, False
    _settle_heap()
    conn.send("ready")
    cpu0 = wall0 = 0.0
    while got < expected:
        items = await mux.read()
        now = time.perf_counter()
        if items and not got:  # CPU is counted from the first frame on
            cpu0, wall0 = cpu_seconds(), now
        for item in items:
            log.recv[index[item.key], item.msg.seq] = now
        got += len(items)
        log.rounds += 1
        log.max_round = max(log.max_round, len(items))
        if not items:
            log.empty_rounds += 1
            stopping = stopping or conn.poll()
            if stopping:
                break
    log.cpu_s, log.wall_s = cpu_seconds() - cpu0, time.perf_counter() - wall0
    await redis.aclose()
    return log


def _consumer_main(spec: HopSpec, conn: Connection) -> None:
    conn.send(asyncio.run(_receive_frames(spec, conn)))
    conn.close()


# --------------------------------------------------------------------------
# Orchestration of the voxbus hop
# --------------------------------------------------------------------------


@dataclass(slots=True)
class HopRun:
    pub: PublishLog
    recv: ReceiveLog




def run_hop(spec: HopSpec) -> HopRun:
    """Start the consumer, then the publisher; collect both logs."""
    ctx = mp.get_context("spawn")
    c_parent, c_child = ctx.Pipe()
    p_parent, p_child = ctx.Pipe()
    consumer = ctx.Process(target=_consumer_main, args=(spec, c_child), name="bus-hop-consumer")
    publisher = ctx.Process(target=_publisher_main, args=(spec, p_child), name="bus-hop-publisher")
    consumer.start()
    try:
        if receive_from(c_parent, consumer, 60) != "ready":
            raise RuntimeError("consumer process did not become ready")
        publisher.start()
        pub_log: PublishLog = receive_from(p_parent, publisher, 60 + 10 * spec.seconds)
        publisher.join()
        if not c_parent.poll(spec.drain_s):
            c_parent.send("stop")  # whatever has not arrived by now counts as lost
        recv_log: ReceiveLog = receive_from(c_parent, consumer, 60)
        consumer.join()
        return HopRun(pub_log, recv_log)
    finally:
        for proc in (publisher, consumer):
            if proc.is_alive():
                proc.terminate()


# --------------------------------------------------------------------------
# Celery anchor
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CelerySpec:
    broker: str
    queue: str
    prefix: str

    @property
    def results_key(self) -> str:
        return f"{self.prefix}stamps"


_stamp_client: Any = None


def _celery_app(spec: CelerySpec) -> Any:
    from celery import Celery

    app = Celery("voxbus_bench", broker=spec.broker)
    app.conf.update(
        task_default_queue=spec.queue,
        task_default_exchange=spec.queue,
        task_default_routing_key=spec.queue,
        broker_transport_options={"global_keyprefix": spec.prefix},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )

    @app.task(name=CELERY_TASK, ignore_result=True)
    def stamp(sample: int) -> None:
        global _stamp_client
        started = time.perf_counter()
        if _stamp_client is None:
            import redis

            _stamp_client = redis.Redis.from_url(spec.broker)
        _stamp_client.rpush(spec.results_key, f"{sample} {started!r}")

    return app


def _celery_worker_main(spec: CelerySpec) -> None:
    app = _celery_app(spec)
    app.worker_main([
        "worker", "--pool=solo", "--concurrency=1", f"--queues={spec.queue}", "--loglevel=WARNING",
        "--without-heartbeat", "--without-mingle", "--without-gossip",
    ])


def _start_celery_worker(spec: CelerySpec, log_file: Any) -> subprocess.Popen:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--celery-worker",
        "--celery-broker", spec.broker, "--celery-queue", spec.queue, "--celery-prefix", spec.prefix,
    ]
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def _one_task(app: Any, client: Any, spec: CelerySpec, sample: int, timeout: float) -> float:
    """Send one task and wait until its body has started; seconds from apply_async to body start."""
    sent = time.perf_counter()
    app.tasks[CELERY_TASK].apply_async((sample,))
    reply = client.blpop([spec.results_key], timeout=timeout)
    if reply is None:
        raise RuntimeError(f"celery task {sample} did not start within {timeout:.0f}s")
    got, started = reply[1].decode().split()
    if int(got) != sample:
        raise RuntimeError(f"celery stamp for task {got} while waiting for {sample}")
    return float(started) - sent


def measure_celery(spec: CelerySpec, client: Any, samples: int, warmup: int) -> np.ndarray:
    """Celery apply_async -> task start latencies (ms), one task at a time, after warm-up."""
    app = _celery_app(spec)
    with tempfile.TemporaryFile() as log_file:
        worker = _start_celery_worker(spec, log_file)
        try:
            _one_task(app, client, spec, -1, timeout=60)  # waits for the worker to come up
            for i in range(warmup):
                _one_task(app, client, spec, i, timeout=10)
                time.sleep(0.002)
            lat = []
            for i in range(samples):
                time.sleep(0.002)  # the worker is idle and blocked in BRPOP when the task comes
                lat.append(_one_task(app, client, spec, warmup + i, timeout=10))
            return np.array(lat) * 1000.0
        except Exception:
            log_file.seek(0)
            sys.stderr.write(log_file.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            app.close()


# --------------------------------------------------------------------------
# Clean-up
# --------------------------------------------------------------------------


def delete_keys(client: Any, keys: list[str]) -> int:
    deleted = 0
    for i in range(0, len(keys), 500):
        deleted += client.delete(*keys[i : i + 500])
    return deleted


def delete_prefixed(client: Any, prefix: str) -> int:
    keys = [k for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    return delete_keys(client, keys) if keys else 0


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------




def _others_pct(pub: PublishLog, recv: ReceiveLog) -> float | None:
    """Machine CPU not spent by this run's publisher, consumer or Redis: the noise under the figures."""
    if not pub.wall_s or not recv.wall_s:
        return None
    ours = pub.cpu_s / pub.wall_s + recv.cpu_s / recv.wall_s + pub.redis_cpu_s / pub.wall_s
    return round(100 * max(0.0, pub.machine_busy * (os.cpu_count() or 1) - ours), 1)


def hop_report(spec: HopSpec, run: HopRun) -> dict[str, Any]:
    pub, recv = run.pub, run.recv
    called = ~np.isnan(pub.call)
    acked = ~np.isnan(pub.ack)
    received = ~np.isnan(recv.recv)
    hop = (recv.recv - pub.call)[received & called] * 1000.0
    publish = (pub.ack - pub.call)[acked] * 1000.0
    lag = (pub.call - pub.due)[called] * 1000.0
    due_to_recv = (recv.recv - pub.due)[received] * 1000.0
    late = (pub.call - pub.due) > FRAME_S
    stats = pub.stats
    return {
        "sessions": spec.sessions,
        "seconds": spec.seconds,
        "frames": int(called.size),
        "published": int(acked.sum()),
        "received": int(received.sum()),
        "lost": int((acked & ~received).sum()),
        "publish_failed": pub.failed,
        "duplicates": pub.duplicates,
        "voxbus_p50_ms": percentile(hop, 50),
        "voxbus_p90_ms": percentile(hop, 90),
        "voxbus_p99_ms": percentile(hop, 99),
        "voxbus_p999_ms": percentile(hop, 99.9),
        "voxbus_max_ms": percentile(hop, 100),
        "publish_p50_ms": percentile(publish, 50),
        "publish_p99_ms": percentile(publish, 99),
        "due_to_receipt_p99_ms": percentile(due_to_recv, 99),
        "pacing_lag_p99_ms": percentile(lag, 99),
        "pacing_lag_max_ms": percentile(lag, 100),
        "late_frames": int(late.sum()),
        "sessions_behind": int(late.any(axis=1).sum()),
        "publisher_wall_s": round(pub.wall_s, 3),
        "drain_s": spec.drain_s,
        "max_batch": stats.get("max_batch"),
        "mean_batch": stats.get("mean_batch"),
        "batches": stats.get("batches"),
        "consumer_rounds": recv.rounds,
        "consumer_max_round": recv.max_round,
        "cpu_publisher_pct": round(100 * pub.cpu_s / pub.wall_s, 1) if pub.wall_s else None,
        "cpu_consumer_pct": round(100 * recv.cpu_s / recv.wall_s, 1) if recv.wall_s else None,
        "cpu_redis_pct": round(100 * pub.redis_cpu_s / pub.wall_s, 1) if pub.wall_s else None,
        "cpu_machine_pct": round(100 * pub.machine_busy * os.cpu_count(), 1),
        "cpu_others_pct": _others_pct(pub, recv),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "block_ms": spec.block_ms,
        "xread_count": spec.count,
        "shard_size": spec.shard_size,
    }


def print_table(report: dict[str, Any]) -> None:
    rows = [
        ("process model", report["process_model"]),
        ("redis", f"{report['redis_url']} (Redis {report['redis_version']}, hiredis {report['hiredis']})"),
        ("sessions x seconds", f"{report['sessions']} x {report['seconds']} s = {report['frames']} frames"),
        ("published / received / lost", f"{report['published']} / {report['received']} / {report['lost']}"),
        ("voxbus hop p50 / p99 / max", f"{report['voxbus_p50_ms']} / {report['voxbus_p99_ms']} / {report['voxbus_max_ms']} ms"),
        ("celery anchor p50 / p99", f"{report['celery_p50_ms']} / {report['celery_p99_ms']} ms ({report['celery_samples']} tasks)"),
        ("ratio p99 (celery / voxbus)", report["ratio_p99"]),
        ("publish -> XADD ack p50 / p99", f"{report['publish_p50_ms']} / {report['publish_p99_ms']} ms"),
        ("due -> receipt p99", f"{report['due_to_receipt_p99_ms']} ms"),
        ("pacing lag p99 / max", f"{report['pacing_lag_p99_ms']} / {report['pacing_lag_max_ms']} ms"),
        ("late frames / sessions behind", f"{report['late_frames']} / {report['sessions_behind']}"),
        ("batches / mean / max", f"{report['batches']} / {report['mean_batch']} / {report['max_batch']}"),
        ("cpu publisher / consumer / redis",
         f"{report['cpu_publisher_pct']}% / {report['cpu_consumer_pct']}% / {report['cpu_redis_pct']}%"),
        ("cpu whole machine / others", f"{report['cpu_machine_pct']}% / {report['cpu_others_pct']}% of "
                                       f"{report['cpus'] * 100}% (load avg {report['loadavg_1m']})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_URL))
    p.add_argument("--celery-db", type=int, default=CELERY_DB, help="Redis db number for the Celery broker")
    p.add_argument("--celery-samples", type=int, default=500, help="Celery anchor tasks (0 skips the anchor)")
    p.add_argument("--celery-warmup", type=int, default=50)
    p.add_argument("--block-ms", type=int, default=50, help="StreamMux XREAD BLOCK")
    p.add_argument("--count", type=int, default=256, help="StreamMux XREAD COUNT per stream")
    p.add_argument("--shard-size", type=int, default=512, help="StreamMux streams per XREAD")
    p.add_argument("--seed", type=int, default=None, help="seed of the sessions' phases")
    p.add_argument("--celery-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--celery-broker", help=argparse.SUPPRESS)
    p.add_argument("--celery-queue", help=argparse.SUPPRESS)
    p.add_argument("--celery-prefix", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _celery_broker(url: str, db: int) -> str:
    """The same Redis server as `url`, database `db`."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def _celery_version() -> str:
    import celery

    return celery.__version__


def _hiredis_version() -> str | None:
    try:
        import hiredis
    except ImportError:
        return None
    return getattr(hiredis, "__version__", "yes")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from shared.redis_conn import redact_url

    run_id = uuid.uuid4().hex[:10]
    spec = HopSpec(
        url=args.redis_url, run_id=run_id, sessions=args.sessions, seconds=args.seconds,
        seed=args.seed if args.seed is not None else random.randrange(2**31),
        block_ms=args.block_ms, count=args.count, shard_size=args.shard_size,
    )
    cspec = CelerySpec(
        broker=_celery_broker(args.redis_url, args.celery_db), queue=f"vbbench.{run_id}", prefix=f"vbbench:{run_id}:"
    )
    client = redis.Redis.from_url(args.redis_url)
    celery_client = redis.Redis.from_url(cspec.broker)
    try:
        celery_ms = np.array([])
        if args.celery_samples > 0:
            celery_ms = measure_celery(cspec, celery_client, args.celery_samples, args.celery_warmup)
        hop = run_hop(spec)
    finally:
        delete_keys(client, [*spec.keys(), spec.warm_key])
        delete_prefixed(celery_client, cspec.prefix)
        version = client.info("server").get("redis_version")
        client.close()
        celery_client.close()
    report: dict[str, Any] = {
        "bench": "bus_hop",
        "process_model": PROCESS_MODEL,
        "redis_url": redact_url(args.redis_url),
        "redis_version": version,
        "hiredis": _hiredis_version(),
        **hop_report(spec, hop),
        "celery_anchor": CELERY_ANCHOR,
        "celery_version": _celery_version(),
        "celery_samples": int(celery_ms.size),
        "celery_warmup": args.celery_warmup if celery_ms.size else 0,
        "celery_p50_ms": percentile(celery_ms, 50),
        "celery_p99_ms": percentile(celery_ms, 99),
        "celery_broker_db": args.celery_db,
        "seed": spec.seed,
    }
    vp99 = report["voxbus_p99_ms"]
    cp99 = report["celery_p99_ms"]
    report["ratio_p99"] = round(cp99 / vp99, 2) if vp99 and cp99 else None
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.celery_worker:
        _celery_worker_main(CelerySpec(args.celery_broker, args.celery_queue, args.celery_prefix))
        return 0
    emit(run(args), args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
