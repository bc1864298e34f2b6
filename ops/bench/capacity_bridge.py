"""The bridge process of ops/bench/capacity.py and the probe that stamps it.

- The bridge runs its REAL ingest path, unmodified: per session a
  `bridge.audio.Resampler` (48 -> 16 kHz), `CallSession.push_audio` (framing,
  batched XADD through the shared `BatchPublisher`), the 20 ms ingest tick
  with batched Silero VAD over all sessions, the turn state machine (ASR jobs
  at pauses and ends of speech, LLM/TTS jobs when transcripts come back) and
  the multiplexed stream reader.
- This process reads the callers' Unix socket and, for each frame, calls the
  resampler and `push_audio` exactly as the WebRTC transport's
  `pump_caller_audio` does; the socket stands in for the network and the Opus
  decoder, whose cost is the transport's, not the ingest path's.
- ingest latency: frame hand-off (the caller's `time.time()` just before the
  socket write, carried as the frame's capture time) -> XADD acknowledged by
  Redis (the BatchPublisher future of that frame resolved; a done-callback in
  the bridge process stamps `time.time()`). It includes the socket, the wait
  for the bridge's event loop, resampling, framing, batching and the Redis
  round trip. The callback is attached through the publisher's public
  `observer` hook; it costs ~1 us per frame and is counted in bridge CPU.
- VAD tick: duration of each 20 ms ingest tick, as the bridge reports it to
  its public `tick_observers`; it includes the batched VAD inference in its
  thread.
- bridge_loop_cpu_cores: the CPU time of the bridge's event-loop thread alone
  (`time.thread_time()`); everything but VAD inference runs there.
- The snapshots at the start and end of the measured window also sample
  Redis (INFO cpu), the machine (/proc/stat), the ASR worker (/proc/PID/stat)
  and the ASR pool's job stream (entries added, entries read minus pending).
"""

from __future__ import annotations

import asyncio
import os
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from capacity_spec import BATCH_HEAD, FRAME_S, IN_RATE, CapSpec, frame_record
from procstats import cpu_seconds, machine_jiffies

from shared.stats import percentile

READ_ROOM = 4 << 20  # the bridge reads the socket into at least this much free buffer


@dataclass(slots=True)
class Snapshot:
    wall: float
    cpu_s: float
    loop_cpu_s: float  # the event loop's thread alone: the bridge's serial part
    redis_cpu_s: float
    machine: tuple[int, int]
    worker_cpu_s: float
    jobs_added: int
    jobs_done: int


@dataclass(slots=True)
class BridgeResult:
    opened: int = 0
    frames_in: int = 0
    ipc_gaps: int = 0
    published: int = 0
    acked: int = 0
    acked_in_window: int = 0
    failed: int = 0
    duplicates: int = 0
    ingest_ms: dict[str, float | None] = field(default_factory=dict)
    tick_ms: dict[str, float | None] = field(default_factory=dict)
    tick_overruns: int = 0
    ticks: int = 0
    start: Snapshot | None = None
    end: Snapshot | None = None
    publisher: dict[str, Any] = field(default_factory=dict)
    vad_events: dict[str, int] = field(default_factory=dict)


class Probe:
    """Stamps in the bridge process: each audio frame's XADD ack, each tick's duration, VAD events.

    Attached through the product's public hooks only: `BatchPublisher.observer` (every entry
    queued, with its future) and `Bridge.tick_observers` (every ingest tick's start and duration)."""

    def __init__(self, measure_from: float, session_ids: list[str]) -> None:
        from shared.protocol import Keys

        self.measure_from = measure_from
        self.event_keys = {Keys.events(sid) for sid in session_ids}
        self.latency = array("d")
        self.tick = array("d")
        self.tick_start = array("d")
        self.result = BridgeResult()
        self.events: Counter[str] = Counter()

    def install(self, bridge: Any) -> None:
        bridge.publisher.observer = self._queued
        bridge.tick_observers.append(self._ticked)

    def _queued(self, key: str, msg: Any, fut: asyncio.Future[Any]) -> None:
        from shared.protocol import AudioFrame, OpusFrame

        if type(msg) is AudioFrame or type(msg) is OpusFrame:
            self.result.published += 1
            fut.add_done_callback(partial(self._acked, msg.ts))
        elif key in self.event_keys:
            self.events[type(msg).__name__] += 1

    def _ticked(self, start: float, duration: float) -> None:
        if time.time() >= self.measure_from:
            self.tick_start.append(start)
            self.tick.append(duration)

    def _acked(self, ts: float, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.result.failed += 1
        elif fut.result() is None:
            self.result.duplicates += 1
        else:
            self.result.acked += 1
            if ts >= self.measure_from:
                self.result.acked_in_window += 1
                self.latency.append(time.time() - ts)

    def summarize(self) -> BridgeResult:
        lat = np.frombuffer(self.latency, dtype=np.float64) * 1000
        ticks = np.frombuffer(self.tick, dtype=np.float64) * 1000
        intervals = np.diff(np.frombuffer(self.tick_start, dtype=np.float64)) * 1000
        r = self.result
        r.ingest_ms = {f"p{q}": percentile(lat, q) for q in (50, 90, 99, 99.9, 100)}
        r.tick_ms = {**{f"p{q}": percentile(ticks, q) for q in (50, 99, 100)}, "interval_p99": percentile(intervals, 99)}
        r.tick_overruns = int((ticks > FRAME_S * 1000).sum())
        r.ticks = int(ticks.size)
        r.vad_events = dict(self.events)
        return r


class Ingest(asyncio.BufferedProtocol):
    """The transport's part for N callers: frames off the socket -> resampler -> push_audio.

    A buffered protocol: the socket is read straight into one preallocated buffer
    and frames are handed on as views of it, so the stand-in for the network costs
    the bridge as little as possible.
    """

    def __init__(self, sessions: list[Any], result: BridgeResult, channels: int) -> None:
        from bridge.audio import Resampler

        self.sessions = sessions
        self.record = frame_record(channels)
        self.resamplers = [Resampler(IN_RATE, 16_000, in_channels=channels) for _ in sessions]
        self.last_seq = np.full(len(sessions), -1, dtype=np.int64)
        self.result = result
        self.done = asyncio.Event()
        self._buf = bytearray(32 << 20)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < READ_ROOM:  # move the partial message to the front
            tail = self._end - self._start
            if tail + READ_ROOM > len(self._buf):  # a message bigger than the buffer: callers catching up
                grown = bytearray(2 * len(self._buf) + READ_ROOM)
                grown[:tail] = self._buf[self._start : self._end]
                self._buf, self._view = grown, memoryview(grown)
            else:
                self._buf[:tail] = self._buf[self._start : self._end]
            self._start, self._end = 0, tail
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        while self._end - self._start >= BATCH_HEAD.size:
            (n,) = BATCH_HEAD.unpack_from(self._buf, self._start)
            if n == 0:
                self.done.set()
                return
            size = BATCH_HEAD.size + n * self.record.itemsize
            if self._end - self._start < size:
                return
            self.push(np.frombuffer(self._buf, dtype=self.record, count=n, offset=self._start + BATCH_HEAD.size))
            self._start += size

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()

    def push(self, recs: np.ndarray) -> None:
        idx = recs["idx"].astype(np.int64)
        seq = recs["seq"].astype(np.int64)
        self.result.ipc_gaps += int((seq != self.last_seq[idx] + 1).sum())
        self.last_seq[idx] = seq
        self.result.frames_in += len(recs)
        for i, ts, pcm in zip(idx.tolist(), recs["ts"].tolist(), recs["pcm"]):
            out = self.resamplers[i].push(pcm)
            if out.size:
                self.sessions[i].push_audio(out, ts)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def snapshot(redis: Any, spec: CapSpec) -> Snapshot:
    from redis.exceptions import ResponseError

    from shared.protocol import Keys

    info = await redis.info("cpu")
    key = Keys.pool_jobs(spec.asr_pool)
    added = done = 0
    try:
        stream = await redis.xinfo_stream(key)
        added = int(stream.get("entries-added") or stream.get("length") or 0)
        for group in await redis.xinfo_groups(key):
            done = int(group.get("entries-read") or 0) - int(group.get("pending") or 0)
    except ResponseError:  # no job yet
        pass
    machine = await asyncio.to_thread(machine_jiffies)
    worker = await asyncio.to_thread(process_cpu_seconds, spec.worker_pid)
    return Snapshot(time.time(), cpu_seconds(), time.thread_time(), float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
                    machine, worker, added, done)


async def run_bridge(spec: CapSpec, conn: Connection) -> BridgeResult:
    import logging

    from bridge.core import Bridge
    from shared.config import load_config

    logging.basicConfig(level=logging.WARNING)
    bridge = Bridge(spec.url, load_config(spec.pools_file))
    await bridge.start()
    session_ids = spec.session_ids()
    sessions = [await bridge.open_session(sid, transport="capacity-bench") for sid in session_ids]
    probe = Probe(measure_from=float("inf"), session_ids=session_ids)
    probe.install(bridge)
    probe.result.opened = len(sessions)
    ingest = Ingest(sessions, probe.result, spec.channels)
    server = await asyncio.get_running_loop().create_unix_server(lambda: ingest, path=spec.socket_path)
    await asyncio.to_thread(conn.send, "ready")
    t0: float = await asyncio.to_thread(conn.recv)
    probe.measure_from = t0 + spec.warmup_s
    await asyncio.sleep(max(0.0, probe.measure_from - time.time()))
    start = await snapshot(bridge.redis, spec)
    await ingest.done.wait()
    await bridge.publisher.flush()
    await asyncio.sleep(0)  # the last done-callbacks
    end = await snapshot(bridge.redis, spec)
    result = probe.summarize()
    result.start, result.end = start, end
    result.publisher = dict(bridge.publisher.stats())
    server.close()
    await bridge.aclose()
    return result


def bridge_main(spec: CapSpec, conn: Connection) -> None:
    """The bridge process (spawned): run, then send the BridgeResult back."""
    conn.send(asyncio.run(run_bridge(spec, conn)))
    conn.close()
