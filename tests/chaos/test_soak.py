"""Soak: hundreds of live sessions for a long time; the bridge's memory stays flat, every stream stays bounded.

Not in CI. Run it with `./ops/dev test -m soak` (it takes VOXBUS_SOAK_MINUTES plus
start-up). Knobs, all from the environment:

    VOXBUS_SOAK_SESSIONS        sessions held open at once (default 200)
    VOXBUS_SOAK_MINUTES         how long (default 30)
    VOXBUS_SOAK_TURN_EVERY_S    each caller asks a question about this often (default 300)
    VOXBUS_SOAK_SESSION_S       half the callers hang up after this long and call again (default 300)
    VOXBUS_SOAK_RTC_CALLERS     callers over real WebRTC, calling again after each answer (default 2)
    VOXBUS_SOAK_WORKERS         worker processes per pool (default 1)
    VOXBUS_SOAK_RSS_SLOPE       allowed slope of the bridge's RSS after warm-up, MB per minute (default 1.0)
    VOXBUS_SOAK_AUDIO_IN_MAXLEN the audio.in bound the bridge publishes with (default: the protocol's;
                                lower it, e.g. 2000, to see trimming in a short run)
    VOXBUS_SOAK_TRACEMALLOC=1   also print where memory grew after the warm-up (slows the bridge down)

Attacked: one bridge process (Silero VAD, turn state machine, playout) holding
VOXBUS_SOAK_SESSIONS sessions, with the worker processes (bundled models) on a
private Redis. Callers are driven the way the WebRTC transport drives a
session: 20 ms of caller audio in and one agent frame out per session every
20 ms; they ask questions (pre-synthesized speech) now and then and get real
answers. Half of them hang up and call again every VOXBUS_SOAK_SESSION_S, so
opening and closing sessions is soaked too; a few callers use real WebRTC,
one call per question.

What must hold:
- flat memory: the bridge process's RSS, sampled every few seconds, has a
  least-squares slope of at most VOXBUS_SOAK_RSS_SLOPE MB per minute after the
  warm-up (a slope, not an allowance: a short run cannot hide a leak in it);
- bounded streams: at every sample, every session stream, pool job stream and
  dead-letter stream is at most its MAXLEN bound plus the slack of approximate
  trimming (one radix-tree node of entries);
- the system keeps working: answers keep coming (virtual and WebRTC callers),
  no WebRTC call fails, no job is dead-lettered, no worker process and no
  bridge task dies. Redis's used_memory slope is reported too.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from bridge.caller import OfferRefused
from bridge.core import Bridge, Overloaded
from bridge.session import CallSession, TurnState
from bridge.transports.webrtc import WebRtcTransport
from shared import protocol
from shared.protocol import FRAME_SAMPLES, Keys, maxlen_for
from shared.redis_conn import connect
from tests.support.chaos import (
    ChaosCluster,
    chaos_bridge,
    connected_caller,
    question_audio,
    run_turn,
)


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


SESSIONS = int(_env("VOXBUS_SOAK_SESSIONS", 200))
MINUTES = _env("VOXBUS_SOAK_MINUTES", 30)
TURN_EVERY_S = _env("VOXBUS_SOAK_TURN_EVERY_S", 300)
SESSION_S = _env("VOXBUS_SOAK_SESSION_S", 300)
RTC_CALLERS = int(_env("VOXBUS_SOAK_RTC_CALLERS", 2))
WORKERS = int(_env("VOXBUS_SOAK_WORKERS", 1))
RSS_SLOPE = _env("VOXBUS_SOAK_RSS_SLOPE", 1.0)
TRACEMALLOC = os.environ.get("VOXBUS_SOAK_TRACEMALLOC") == "1"
AUDIO_IN_MAXLEN = int(_env("VOXBUS_SOAK_AUDIO_IN_MAXLEN", protocol.STREAM_MAXLEN["audio.in"]))
SAMPLE_S = 5.0
STOP_GRACE_S = 30.0  # at the end, a WebRTC caller may finish the turn it is in
TRIM_SLACK = 200  # MAXLEN ~ trims whole radix-tree nodes (stream-node-max-entries, 100 by default)
QUESTIONS = ("Tell me about the sun.", "What is a volcano?", "How do airplanes fly?")

pytestmark = [pytest.mark.soak, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(int(MINUTES * 60) + 1200)]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class SoakSink:
    """A caller's end of the data channels: counts answers (agent_speaking -> listening) and errors."""

    def __init__(self) -> None:
        self.tokens = 0
        self.answers = 0
        self.errors: list[dict[str, Any]] = []
        self.busy = 0
        self._speaking: int | None = None

    def send_tokens(self, turn: int, seq: int, text: str, final: bool) -> None:
        self.tokens += 1

    def send_control(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "error":
            self.errors.append(msg)
        elif msg.get("type") == "busy":
            self.busy += 1
        elif msg.get("type") == "state":
            if msg["state"] == "agent_speaking":
                self._speaking = msg["turn"]
            elif msg["state"] == "listening" and self._speaking is not None:
                self.answers += 1
                self._speaking = None


@dataclass
class VirtualCaller:
    index: int
    churns: bool
    sink: SoakSink = field(default_factory=SoakSink)
    session: CallSession | None = None
    born: float = 0.0
    next_question: float = 0.0
    mic: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    calls: int = 0

    def take_frame(self) -> np.ndarray:
        frame, self.mic = self.mic[:FRAME_SAMPLES], self.mic[FRAME_SAMPLES:]
        return frame if len(frame) == FRAME_SAMPLES else np.concatenate(
            [frame, np.zeros(FRAME_SAMPLES - len(frame), dtype=np.int16)])


@dataclass
class Soak:
    bridge: Bridge
    transport: WebRtcTransport
    cluster: ChaosCluster
    redis: aioredis.Redis
    questions: list[np.ndarray]
    rng: random.Random = field(default_factory=lambda: random.Random(30))
    callers: list[VirtualCaller] = field(default_factory=list)
    sids: set[str] = field(default_factory=set)  # every session ever opened (their streams outlive them)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    redis_mb: list[float] = field(default_factory=list)
    max_len: dict[str, tuple[int, str]] = field(default_factory=dict)  # kind -> (longest XLEN, key)
    violations: list[str] = field(default_factory=list)
    rtc_calls: list[int] = field(default_factory=list)
    rtc_failures: list[str] = field(default_factory=list)  # calls that failed without the caller being told why
    rtc_busy: int = 0  # calls refused (503) or answered "busy": overload, made visible
    refused: int = 0  # virtual callers refused for overload
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    heap: tracemalloc.Snapshot | None = None  # at the end of the warm-up (VOXBUS_SOAK_TRACEMALLOC=1)

    async def open(self, c: VirtualCaller) -> None:
        c.session = await self.bridge.open_session(sink=c.sink, transport="soak")
        c.born = time.monotonic()
        c.calls += 1
        self.sids.add(c.session.id)

    async def drive(self) -> None:
        """What the transport does for every call: 20 ms of caller audio in, one agent frame out."""
        next_tick = time.monotonic()
        while not self.stop.is_set():
            for c in self.callers:
                s = c.session
                if s is not None and not s.closed:
                    s.push_audio(c.take_frame())
                    s.next_frame()
            next_tick += 0.02
            delay = next_tick - time.monotonic()
            if delay < -1.0:  # far behind: skip ahead instead of bursting
                next_tick = time.monotonic()
            await asyncio.sleep(max(0.0, delay))

    async def schedule(self) -> None:
        """Questions now and then; churning callers hang up and call again (later, when refused)."""
        while not self.stop.is_set():
            now = time.monotonic()
            for c in self.callers:
                s = c.session
                if s is None:
                    if now >= c.next_question:
                        await self.reopen(c, now)
                    continue
                if c.churns and now - c.born >= SESSION_S and s.state == TurnState.LISTENING:
                    await self.bridge.close_session(s.id)
                    c.session = None
                    await self.reopen(c, now)
                elif now >= c.next_question and s.state == TurnState.LISTENING and not len(c.mic):
                    c.mic = self.rng.choice(self.questions)
                    c.next_question = now + TURN_EVERY_S * self.rng.uniform(0.5, 1.5)
            await asyncio.sleep(0.25)

    async def reopen(self, c: VirtualCaller, now: float) -> None:
        try:
            await self.open(c)
            c.next_question = now + self.rng.uniform(5, TURN_EVERY_S)
        except Overloaded:  # the bridge says so (a 503 over HTTP); the caller tries again later
            self.refused += 1
            c.next_question = now + 10.0

    async def call_over_webrtc(self, index: int) -> None:
        """A real caller: call, ask, hear the whole answer, hang up; again until the end."""
        while not self.stop.is_set():
            client = None
            try:
                client = await connected_caller(self.transport)
                self.sids.add(client.session_id)
                await run_turn(client, QUESTIONS[self.rtc_calls[index] % len(QUESTIONS)])
                self.rtc_calls[index] += 1
            except OfferRefused as exc:
                if exc.status != 503:
                    self.rtc_failures.append(f"offer refused: {exc}"[:300])
                self.rtc_busy += 1
                await asyncio.sleep(5.0)
            except Exception as exc:  # noqa: BLE001 (counted and reported; the soak goes on)
                if client is not None and client.controls("busy"):
                    self.rtc_busy += 1  # overloaded, and told so: not a silent failure
                else:
                    self.rtc_failures.append(f"{type(exc).__name__}: {exc}"[:300])
            finally:
                if client is not None:
                    await client.aclose()

    async def sample(self, started: float) -> None:
        while not self.stop.is_set():
            self.rss.append((time.monotonic() - started, rss_mb()))
            if TRACEMALLOC and self.heap is None and self.rss[-1][0] >= warm_up_s():
                self.heap = tracemalloc.take_snapshot()
            await self.check_lengths()
            self.redis_mb.append(int((await self.redis.info("memory"))["used_memory"]) / 2**20)
            try:
                await asyncio.wait_for(self.stop.wait(), SAMPLE_S)
            except TimeoutError:
                pass

    async def check_lengths(self) -> None:
        keys = [k for sid in sorted(self.sids) for k in Keys.session_streams(sid)]
        keys += [Keys.pool_jobs(p) for p in self.cluster.pools.values()]
        keys += [Keys.pool_dlq(p) for p in self.cluster.pools.values()] + [Keys.DLQ]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.xlen(key)
        for key, length in zip(keys, await pipe.execute()):
            kind = key.rsplit(":", 1)[-1]
            bound = maxlen_for(key) + TRIM_SLACK
            if length > bound and len(self.violations) < 50:
                self.violations.append(f"{key}: XLEN {length} > {bound}")
            if length > self.max_len.get(kind, (0, ""))[0]:
                self.max_len[kind] = (length, key)


async def test_soak_memory_flat_and_streams_bounded(chaos_cluster: ChaosCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = chaos_cluster
    await asyncio.gather(*(asyncio.to_thread(cluster.ensure, stage, WORKERS) for stage in cluster.pools))
    monkeypatch.setitem(protocol.STREAM_MAXLEN, "audio.in", AUDIO_IN_MAXLEN)  # read at every publish
    questions = [await asyncio.to_thread(question_audio, q) for q in QUESTIONS]
    if TRACEMALLOC:
        tracemalloc.start()
    redis = connect(cluster.redis_url)
    dlq_before = {pool: await redis.xlen(Keys.pool_dlq(pool)) for pool in cluster.pools.values()}
    async with chaos_bridge(cluster, max_sessions=SESSIONS + RTC_CALLERS + 8) as (bridge, transport):
        soak = Soak(bridge, transport, cluster, redis, questions)
        soak.callers = [VirtualCaller(i, churns=i % 2 == 1) for i in range(SESSIONS)]
        started = time.monotonic()
        for c in soak.callers:  # staggered: callers arrive over the first half minute
            await soak.open(c)
            c.born -= soak.rng.uniform(0, SESSION_S)  # hang-ups spread over the run, not all at once
            c.next_question = started + soak.rng.uniform(5, min(TURN_EVERY_S, MINUTES * 30))
            await asyncio.sleep(30 / SESSIONS)
        soak.rtc_calls = [0] * RTC_CALLERS
        tasks = [asyncio.create_task(soak.drive(), name="drive"), asyncio.create_task(soak.schedule(), name="schedule"),
                 asyncio.create_task(soak.sample(started), name="sample")]
        tasks += [asyncio.create_task(soak.call_over_webrtc(i), name=f"rtc-{i}") for i in range(RTC_CALLERS)]
        try:
            end = started + MINUTES * 60
            while time.monotonic() < end:
                await asyncio.sleep(min(10.0, max(0.0, end - time.monotonic())))
                broken = [t.get_name() for t in tasks if t.done()]
                assert not broken, f"soak tasks ended early: {broken}: {[t.exception() for t in tasks if t.done()]}"
                assert not bridge.tasks.failed.is_set(), f"a bridge task died: {bridge.tasks.failure}"
                assert all(w.alive for w in cluster.all_live()), "a worker process died"
                elapsed = time.monotonic() - started
                print(f"soak {elapsed:5.0f} s: {len(bridge.sessions)} sessions, rss {soak.rss[-1][1]:.0f} MB, "
                      f"publisher backlog {len(getattr(bridge.publisher, '_buf', ()))}, "
                      f"answers {sum(c.sink.answers for c in soak.callers)} (+{sum(soak.rtc_calls)} over WebRTC), "
                      f"redis {soak.redis_mb[-1] if soak.redis_mb else 0:.0f} MB", flush=True)
        finally:
            soak.stop.set()
            await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in soak.callers:
                if c.session is not None:
                    await bridge.close_session(c.session.id)
        await soak.check_lengths()

    try:
        report(soak)
        if soak.heap is not None:
            print("memory grown after the warm-up, by line:")
            for stat in tracemalloc.take_snapshot().compare_to(soak.heap, "lineno")[:15]:
                print(f"  {stat}")
            tracemalloc.stop()
        workers = cluster.all_live()
        assert all(w.alive for w in workers)
        assert not soak.violations, f"streams above their bound: {soak.violations}"
        warm = [(t, mb) for t, mb in soak.rss if t >= warm_up_s()]
        assert len(warm) >= 10, f"too few samples after the warm-up ({warm_up_s():.0f} s) to judge memory"
        slope = slope_per_min(warm)
        assert slope <= RSS_SLOPE, (
            f"the bridge's RSS grows {slope:.2f} MB/min after the warm-up ({warm[0][1]:.0f} -> {warm[-1][1]:.0f} MB), "
            f"more than {RSS_SLOPE:g} MB/min")
        assert not soak.rtc_failures, f"{len(soak.rtc_failures)} WebRTC calls failed: {soak.rtc_failures[:3]}"
        answers = sum(c.sink.answers for c in soak.callers)
        errors = [e for c in soak.callers for e in c.sink.errors]
        assert answers > 0, "no virtual caller got an answer"
        assert not errors, f"{len(errors)} jobs failed, e.g. {errors[:3]}"
        assert all(n > 0 for n in soak.rtc_calls) or soak.rtc_busy, (
            f"WebRTC calls answered per caller: {soak.rtc_calls}; {soak.rtc_failures[:3]}")
        for pool, before in dlq_before.items():
            assert await redis.xlen(Keys.pool_dlq(pool)) == before, f"jobs of {pool} were dead-lettered"
    finally:
        await redis.aclose()


def warm_up_s() -> float:
    return max(90.0, MINUTES * 60 * 0.2)


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    ts = np.array([t for t, _ in samples]) / 60.0
    ys = np.array([v for _, v in samples])
    return float(np.polyfit(ts, ys, 1)[0]) if len(samples) >= 2 and np.ptp(ts) > 0 else 0.0


def report(soak: Soak) -> None:
    post = [mb for t, mb in soak.rss if t >= warm_up_s()]
    print(f"\nsoak: {SESSIONS} sessions for {MINUTES:g} min; {sum(c.calls for c in soak.callers)} sessions opened "
          f"({len(soak.sids)} in all with WebRTC calls)")
    busy = sum(c.sink.busy for c in soak.callers)
    print(f"answers: {sum(c.sink.answers for c in soak.callers)} virtual (+{busy} busy, {soak.refused} calls refused "
          f"as overloaded), WebRTC calls {soak.rtc_calls} ({soak.rtc_busy} busy or refused, "
          f"{len(soak.rtc_failures)} failed{': ' + soak.rtc_failures[0] if soak.rtc_failures else ''})")
    warm = [(t, mb) for t, mb in soak.rss if t >= warm_up_s()]
    print(f"bridge RSS MB: start {soak.rss[0][1]:.0f}, max {max(mb for _, mb in soak.rss):.0f}, "
          f"after warm-up {post[0] if post else float('nan'):.0f} -> end {soak.rss[-1][1]:.0f}; "
          f"slope after warm-up {slope_per_min(warm):.2f} MB/min")
    redis_warm = [(t, mb) for (t, _), mb in zip(soak.rss, soak.redis_mb) if t >= warm_up_s()]
    print(f"redis used_memory MB: max {max(soak.redis_mb, default=0):.0f}, end {soak.redis_mb[-1] if soak.redis_mb else 0:.0f}; "
          f"slope after warm-up {slope_per_min(redis_warm):.2f} MB/min")
    print("longest streams: " + ", ".join(f"{k} {n} (bound {maxlen_for(key)})" for k, (n, key) in sorted(soak.max_len.items())))
