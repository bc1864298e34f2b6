"""The chaos suite's world: a private Redis, real worker processes, a bridge with real WebRTC callers.

Chaos tests kill processes, restart Redis and flood streams, so nothing here touches the shared Redis:
`ChaosCluster` is a private `redis-server` on a free loopback port (no persistence) with real
`voxbus worker` processes for the pools of ops/pools/cpu.toml, each serving Prometheus `/metrics` on its
own port; tests kill workers (`WorkerProc.kill`: SIGKILL), top pools up again (`ChaosCluster.ensure`),
read worker counters and crash and restart Redis. `chaos_bridge` is a Bridge plus the direct WebRTC
transport on it; `run_turn` asks one spoken question and waits for its complete answer the way a caller
sees it; `output_ids` / `assert_no_duplicate_outputs` read the (turn, seq) identity of every output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis as sync_redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from bridge import caller
from bridge.core import Bridge
from bridge.transports.webrtc import WebRtcTransport
from shared.admin.embedded_redis import EmbeddedRedis, free_port
from shared.config import Config, parse_config
from shared.protocol import (
    AudioOut,
    Keys,
    OpusOut,
    ProtocolError,
    TokenChunk,
    decode_entry,
    decode_worker,
    output_entry_id,
)
from tests.support.bridge import TOKEN, running_bridge
from tests.support.prom import sample_sum

ROOT = Path(__file__).resolve().parents[2]
WORKER_START_TIMEOUT_S = 300.0
TURN_TIMEOUT_S = 150.0  # one spoken question to the end of its answer's playout, on 2 busy cores


# ----------------------------------------------------------------------------- worker processes

@dataclass
class WorkerProc:
    """One `voxbus worker` process of the suite."""

    pool: str
    stage: str
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no drain, no deregistration, no acks."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, chars: int = 2500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def counter(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` (e.g. "voxbus_bus_rejected_total") whose labels include `labels`."""
        return sample_sum(text_string_to_metric_families(self.metrics_text()), name, **labels)


def pool_counter(workers: list[WorkerProc], name: str, **labels: str) -> float:
    return sum(w.counter(name, **labels) for w in workers)


@dataclass
class ChaosCluster:
    """The suite's private Redis and its worker processes (sync API: call it via asyncio.to_thread)."""

    server: EmbeddedRedis
    workdir: Path
    pools_file: Path
    pools: dict[str, str]  # stage -> pool name
    workers: list[WorkerProc] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return self.server.url

    def config(self, **bridge: Any) -> Config:
        cfg = parse_config(tomllib.loads(self.pools_file.read_text()), str(self.pools_file))
        bridge = {"offer_burst": 10_000, "offer_rate_per_s": 1000.0, **bridge}  # every test caller is 127.0.0.1
        for key, value in bridge.items():
            setattr(cfg.bridge, key, value)
        return cfg

    def live(self, stage: str) -> list[WorkerProc]:
        return [w for w in self.workers if w.stage == stage and w.alive]

    def all_live(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.alive]

    def by_id(self, worker_id: str) -> WorkerProc:
        for w in self.workers:
            if w.worker_id == worker_id:
                return w
        raise KeyError(f"no worker {worker_id!r} among {[w.worker_id for w in self.workers]}")

    def _spawn(self, stage: str) -> WorkerProc:
        pool = self.pools[stage]
        port = free_port()
        log_path = self.workdir / f"{pool}-{len(self.workers)}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "worker", "--pool", pool, "--pools", str(self.pools_file),
                 "--redis-url", self.redis_url, "--metrics-port", str(port)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        worker = WorkerProc(pool, stage, proc, port, log_path)
        self.workers.append(worker)
        return worker

    def _wait_registered(self, started: list[WorkerProc], timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
        client = sync_redis.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + timeout_s
            waiting = list(started)
            while waiting:
                for w in waiting:
                    if not w.alive:
                        raise RuntimeError(f"worker of {w.pool} exited with {w.proc.returncode}:\n{w.log_tail()}")
                for w in list(waiting):
                    for rec in worker_records_sync(client, w.pool):
                        if rec.pid == w.pid:
                            w.worker_id = rec.worker_id
                            waiting.remove(w)
                            break
                if waiting and time.monotonic() > deadline:
                    raise RuntimeError(f"workers {[w.pool for w in waiting]} not registered in {timeout_s:.0f} s:\n"
                                       + "\n".join(w.log_tail() for w in waiting))
                time.sleep(0.1)
        finally:
            client.close()

    def ensure(self, stage: str, n: int) -> list[WorkerProc]:
        """At least `n` live, registered workers of `stage`'s pool (starting what is missing)."""
        started = [self._spawn(stage) for _ in range(n - len(self.live(stage)))]
        if started:
            self._wait_registered(started)
        return self.live(stage)

    def ensure_all(self, n: int) -> None:
        started = [self._spawn(stage) for stage in self.pools for _ in range(n - len(self.live(stage)))]
        if started:
            self._wait_registered(started)

    def crash_redis(self) -> None:
        """SIGKILL the Redis server: no clean shutdown, and (no persistence) every key is gone."""
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait()
        self.server.stop()  # releases its data directory; the process is gone already

    def start_redis(self) -> None:
        """Start an empty redis-server on the same port and wait until it answers."""
        self.server.start()
        wait_redis_sync(self.server)

    def stop(self) -> None:
        for w in self.workers:
            if w.alive:
                w.proc.terminate()
        for w in self.workers:
            try:
                w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        self.server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)  # the pools file and the workers' logs


def worker_records_sync(client: sync_redis.Redis, pool: str) -> list[Any]:
    ids = client.zrange(Keys.pool_workers(pool), 0, -1)
    if not ids:
        return []
    raw = client.mget([Keys.worker(pool, i.decode()) for i in ids])
    out = []
    for data in raw:
        if data is None:
            continue
        with contextlib.suppress(ProtocolError):
            out.append(decode_worker(data))
    return out


def wait_redis_sync(server: EmbeddedRedis, timeout_s: float = 15.0) -> None:
    """PING until the server answers, and check it is our child (not another server on the port)."""
    client = sync_redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=2)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                pid = int(client.info("server")["process_id"])
                if server.proc is not None and pid != server.proc.pid:
                    raise RuntimeError(f"port {server.port} is served by another Redis (pid {pid})")
                return
            except sync_redis.ConnectionError:
                if time.monotonic() > deadline or (server.proc is not None and server.proc.poll() is not None):
                    raise RuntimeError(f"private Redis did not start: {server.log_tail()}") from None
                time.sleep(0.05)
    finally:
        client.close()


# ----------------------------------------------------------------------------- bridge and callers

@contextlib.asynccontextmanager
async def chaos_bridge(cluster: ChaosCluster, **bridge_options: Any) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    """Bridge + WebRTC transport on a free loopback port, on the cluster's private Redis."""
    async with running_bridge(cluster.redis_url, cluster.config(**bridge_options)) as pair:
        yield pair


class Caller(caller.RtcClient):
    """The product's simulated caller with this suite's token."""

    def __init__(self, base_url: str, token: str | None = TOKEN, **kwargs: Any) -> None:
        super().__init__(base_url, token, **kwargs)


async def connected_caller(transport: WebRtcTransport, session_id: str | None = None) -> Caller:
    client = Caller(transport.url)
    try:
        await client.connect(session_id=session_id)
        await client.wait_open()
    except BaseException:
        await client.aclose()
        raise
    return client


def question_audio(text: str) -> np.ndarray:
    from tests.engines.speech import pad_silence, synthesize_16k

    return pad_silence(synthesize_16k(text), 0.3, 0.3)


@dataclass
class TurnResult:
    turn: int
    heard: str  # the caller's final transcript
    agent_text: str  # the turn's reply as turn_metrics reports it
    token_text: str  # the reply as the caller's token deltas spell it
    audio_frames: int  # agent frames with sound that reached the caller during the turn
    asked_at: float


def final_transcripts(client: caller.RtcClient) -> list[dict[str, Any]]:
    return [m for m in client.controls("transcript") if m.get("final") and str(m.get("text", "")).strip()]


async def wait_transcript(client: caller.RtcClient, known: int, timeout: float = TURN_TIMEOUT_S) -> dict[str, Any]:
    """The first non-empty final transcript after the `known` ones already received."""
    found = await client.wait_for(lambda: final_transcripts(client)[known:], timeout, "the caller's final transcript")
    return found[0]


async def wait_turn_done(client: caller.RtcClient, turn: int, asked_at: float,
                         timeout: float = TURN_TIMEOUT_S) -> TurnResult:
    """Wait until `turn` is answered completely: final token, agent audio heard, state back to listening."""

    def done() -> bool:
        states = [(m["state"], m.get("turn")) for m in client.controls("state")]
        spoke = ("agent_speaking", turn) in states
        return spoke and states[-1] == ("listening", turn) and any(
            m["t"] == turn and m["f"] for _, m in client.tokens)

    await client.wait_for(done, timeout, f"turn {turn} to be answered and played to its end")
    metrics = [m for m in client.controls("turn_metrics") if m.get("turn") == turn and m.get("agent_text")]
    assert metrics, f"no turn_metrics with the reply of turn {turn}: {client.controls('turn_metrics')[-3:]}"
    deltas = sorted((m["s"], m["d"]) for _, m in client.tokens if m["t"] == turn)
    heard = next((m["text"] for m in final_transcripts(client) if m["turn"] == turn), "")
    return TurnResult(turn, heard, metrics[-1]["agent_text"], "".join(d for _, d in deltas).strip(),
                      len(client.audio_frames(since=asked_at)), asked_at)


async def run_turn(client: caller.RtcClient, text: str, timeout: float = TURN_TIMEOUT_S,
                   during: Callable[[], Any] | None = None) -> TurnResult:
    """Speak `text`, then wait for the answer to be complete; `during` runs once the question is queued."""
    known = len(final_transcripts(client))
    asked_at = time.time()
    client.mic.play(question_audio(text))
    if during is not None:
        result = during()
        if asyncio.iscoroutine(result):
            await result
    transcript = await wait_transcript(client, known, timeout)
    return await wait_turn_done(client, int(transcript["turn"]), asked_at, timeout)


# ----------------------------------------------------------------------------- stream checks

async def output_ids(redis: aioredis.Redis, key: str) -> list[tuple[str, int, int, bool]]:
    """(entry id, turn, seq, final) of every output of a session's tokens or audio.out stream.

    Entries a reader would reject (malformed, of another type or naming another
    session: what the hostile tests plant) are not outputs and are left out.
    """
    kind: tuple[type, ...] = (TokenChunk,) if key.endswith(":tokens") else (AudioOut, OpusOut)
    sid = key[key.index("{") + 1 : key.index("}")]
    out: list[tuple[str, int, int, bool]] = []
    for entry_id, fields in await redis.xrange(key):
        try:
            msg = decode_entry(fields)
        except ProtocolError:
            continue
        if isinstance(msg, kind) and msg.session == sid:
            out.append((entry_id.decode(), msg.turn, msg.seq, msg.final))
    return out


async def assert_no_duplicate_outputs(redis: aioredis.Redis, sid: str, turn: int) -> dict[str, int]:
    """Every (turn, seq) of the session's tokens and audio.out streams appears once, under its own entry id,
    and `turn` is complete: seqs 0..final without gaps, exactly one final. Returns entries per stream."""
    counts: dict[str, int] = {}
    for key in (Keys.tokens(sid), Keys.audio_out(sid)):
        rows = await output_ids(redis, key)
        dupes = sorted(p for p, n in Counter((t, s) for _, t, s, _ in rows).items() if n > 1)
        assert not dupes, f"{key}: duplicate (turn, seq) {dupes[:10]}"
        wrong = [(eid, t, s) for eid, t, s, _ in rows if eid != output_entry_id(t, s)]
        assert not wrong, f"{key}: entries not under their (turn, seq) id: {wrong[:10]}"
        seqs = sorted(s for _, t, s, _ in rows if t == turn)
        finals = [s for _, t, s, f in rows if t == turn and f]
        assert len(finals) == 1 and finals[0] == seqs[-1], f"{key}: turn {turn} finals at {finals}, last seq {seqs[-1:]}"
        assert seqs == list(range(len(seqs))), f"{key}: turn {turn} has gaps: {seqs}"
        counts[key] = len(seqs)
    return counts


def assert_caller_tokens_unique(client: caller.RtcClient) -> None:
    dupes = sorted(p for p, n in Counter((m["t"], m["s"]) for _, m in client.tokens).items() if n > 1)
    assert not dupes, f"the caller received token deltas twice: {dupes[:10]}"


async def eventually(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------- collection
