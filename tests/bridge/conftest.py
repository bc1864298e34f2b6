"""Fixtures and helpers for the WebRTC transport tests.

- `workers` (session scope): real worker processes (`voxbus worker`) for the
  CPU pools of ops/pools/cpu.toml under unique pool names (the default Redis
  is shared with other test runs). Started once per pytest run, also for
  tests/browser (which loads this file for `shared_workers`).
- `running_bridge`: a Bridge (real Silero VAD) plus the WebRTC transport on a
  free loopback port, inside one event loop.
- `RtcClient`: an aiortc caller on loopback: plays a speech clip in real time,
  records agent audio frames (arrival time, RMS), tokens and control messages.

No `__init__.py` in this directory on purpose: with pytest's default
("prepend") import mode it would make this directory the `bridge` package and
shadow the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
import redis as sync_redis
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from bridge.audio import Resampler
from bridge.core import Bridge
from bridge.transports import rtc_setup
from bridge.transports.webrtc import WebRtcTransport
from shared.config import DEFAULT_POOLS_FILE, Config, parse_config
from shared.protocol import Keys

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-" + uuid.uuid4().hex[:8]
WORKER_START_TIMEOUT_S = 240.0
_TIME_BASE = fractions.Fraction(1, 48_000)
SILENCE_RMS = 30.0  # decoded Opus of digital silence stays far below this; speech is far above


# ----------------------------------------------------------------------------- worker processes

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def unique_pools_toml(suffix: str) -> str:
    """ops/pools/cpu.toml with every pool renamed `<name>-<suffix>`."""
    data = tomllib.loads(DEFAULT_POOLS_FILE.read_text())
    lines = ["[defaults]"]
    lines += [f"{stage} = {_toml_value(f'{pool}-{suffix}')}" for stage, pool in data.get("defaults", {}).items()]
    for name, pool in data["pools"].items():
        lines.append(f"\n[pools.{name}-{suffix}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in pool.items() if k != "fallback"]
    if data.get("bridge"):
        lines.append("\n[bridge]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data["bridge"].items()]
    return "\n".join(lines) + "\n"


@dataclass
class WorkerSet:
    pools_file: Path
    pools: dict[str, str]  # stage -> pool name
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def config(self) -> Config:
        return parse_config(tomllib.loads(self.pools_file.read_text()), str(self.pools_file))

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs if p.exists())


def start_workers(redis_url: str, workdir: Path) -> WorkerSet:
    suffix = "t" + uuid.uuid4().hex[:8]
    pools_file = workdir / "pools.toml"
    pools_file.write_text(unique_pools_toml(suffix))
    ws = WorkerSet(pools_file, {})
    cfg = ws.config()
    ws.pools = {stage: cfg.default_pool(stage).name for stage in ("asr", "llm", "tts")}
    env = {**os.environ, "REDIS_URL": redis_url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for pool in ws.pools.values():
        log = workdir / f"{pool}.log"
        ws.logs.append(log)
        with open(log, "wb") as out:
            ws.procs.append(subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "worker", "--pool", pool, "--pools", str(pools_file)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    client = sync_redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        waiting = set(ws.pools.values())
        while waiting:
            for proc in ws.procs:
                if proc.poll() is not None:
                    stop_workers(ws, redis_url)
                    pytest.fail(f"a worker exited with code {proc.returncode} while starting:\n{ws.log_tail()}", pytrace=False)
            waiting = {p for p in waiting if not client.zcard(Keys.pool_workers(p))}
            if waiting and time.monotonic() > deadline:
                stop_workers(ws, redis_url)
                pytest.fail(f"workers of {sorted(waiting)} not ready in {WORKER_START_TIMEOUT_S:.0f} s:\n{ws.log_tail()}",
                            pytrace=False)
            time.sleep(0.2)
    finally:
        client.close()
    return ws


def stop_workers(ws: WorkerSet, redis_url: str) -> None:
    for proc in ws.procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in ws.procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    client = sync_redis.Redis.from_url(redis_url)
    try:
        for pool in ws.pools.values():
            keys = [Keys.pool_jobs(pool), Keys.pool_dlq(pool), Keys.pool_errors(pool), Keys.pool_workers(pool)]
            keys += list(client.scan_iter(match=f"vb:worker:{pool}:*", count=1000))
            client.delete(*keys)
            client.srem(Keys.POOLS, pool)
    finally:
        client.close()


def shared_workers(request: pytest.FixtureRequest, redis_url: str) -> WorkerSet:
    """The run's one WorkerSet (kept on the pytest config so tests/browser finds the same one)."""
    ws: WorkerSet | None = getattr(request.config, "_voxbus_workers", None)
    if ws is None:
        workdir = Path(tempfile.mkdtemp(prefix="voxbus-bridge-tests-"))
        ws = start_workers(redis_url, workdir)
        request.config._voxbus_workers = ws  # type: ignore[attr-defined]
        request.config.add_cleanup(lambda: stop_workers(ws, redis_url))
    return ws


@pytest.fixture(scope="session")
def workers(request: pytest.FixtureRequest, redis_url: str) -> WorkerSet:
    return shared_workers(request, redis_url)


def pools_config(**bridge: Any) -> Config:
    """A Config with unique pool names and no workers (for tests that never reach a pool)."""
    suffix = "t" + uuid.uuid4().hex[:8]
    cfg = parse_config(tomllib.loads(unique_pools_toml(suffix)), "test")
    for key, value in bridge.items():
        setattr(cfg.bridge, key, value)
    return cfg


# ----------------------------------------------------------------------------- bridge

@contextlib.asynccontextmanager
async def running_bridge(redis_url: str, config: Config, **options: Any) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    """Bridge + WebRTC transport on a free loopback port; the Redis keys of its sessions are deleted after."""
    rtc_setup.include_loopback_candidates()  # the client peer lives in this process too
    bridge = Bridge(redis_url, config)
    opened: list[str] = []
    real_open = bridge.open_session

    async def recording_open(*args: Any, **kwargs: Any) -> Any:
        session = await real_open(*args, **kwargs)
        opened.append(session.id)
        return session

    bridge.open_session = recording_open  # type: ignore[method-assign]
    await bridge.start()
    transport = WebRtcTransport(bridge, token=TOKEN, host="127.0.0.1", port=0, loopback_candidates=True, **options)
    try:
        await transport.start()
        yield bridge, transport
    finally:
        await transport.stop()
        await bridge.stop()
        await delete_session_keys(redis_url, opened)


async def delete_session_keys(redis_url: str, sids: list[str]) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    try:
        def run() -> None:
            for sid in sids:
                keys = [*Keys.session_streams(sid), Keys.ctx(sid), Keys.meta(sid), Keys.cancelled_turn(sid)]
                client.delete(*keys)
                client.zrem(Keys.SESSIONS, sid)
        await asyncio.to_thread(run)
    finally:
        client.close()


# ----------------------------------------------------------------------------- client peer

class SpeechTrack(MediaStreamTrack):
    """A microphone that plays queued 16 kHz clips in real time (48 kHz mono frames), then silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue = np.zeros(0, dtype=np.int16)
        self._start: float | None = None
        self._pts = 0
        self.playing_until = 0.0  # wall clock at which the queued audio ends

    def play(self, pcm16k: np.ndarray) -> None:
        up = Resampler(16_000, 48_000)
        pcm = np.concatenate([up.push(pcm16k), up.flush()])
        self._queue = np.concatenate([self._queue, pcm])
        self.playing_until = max(self.playing_until, time.time()) + len(self._queue) / 48_000

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += 960
            delay = self._start + self._pts / 48_000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        chunk, self._queue = self._queue[:960], self._queue[960:]
        if len(chunk) < 960:
            chunk = np.concatenate([chunk, np.zeros(960 - len(chunk), dtype=np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48_000
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        return frame



class OfferRefused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class RtcClient:
    """A caller peer: mic track, the two client-created channels, agent audio recorder."""

    def __init__(self, base_url: str, token: str | None = TOKEN) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = SpeechTrack()
        self.pc.addTrack(self.mic)
        self.tokens_ch = self.pc.createDataChannel("llm_tokens", ordered=False, maxRetransmits=0)
        self.control_ch = self.pc.createDataChannel("control")
        self.control: list[tuple[float, dict[str, Any]]] = []
        self.tokens: list[tuple[float, dict[str, Any]]] = []
        self.audio: list[tuple[float, float]] = []  # (arrival wall clock, RMS) per received frame
        self.session_id = ""
        self.answer_sdp = ""
        self.offer_sdp = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self.control_ch.on("message", lambda m: self._record(self.control, m))
        self.tokens_ch.on("message", lambda m: self._record(self.tokens, m))
        self.pc.on("track", self._on_track)

    def _record(self, into: list[tuple[float, dict[str, Any]]], raw: str | bytes) -> None:
        into.append((time.time(), json.loads(raw)))
        self._changed.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._read_audio(track)))

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pcm = frame.to_ndarray().astype(np.float64)
            self.audio.append((time.time(), float(np.sqrt(np.mean(pcm**2))) if pcm.size else 0.0))
            self._changed.set()

    async def connect(self, session_id: str | None = None, **extra: Any) -> dict[str, Any]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.offer_sdp = self.pc.localDescription.sdp
        body = {"sdp": self.offer_sdp, "type": "offer", **extra}
        if session_id is not None:
            body["session_id"] = session_id
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.base_url}/v1/offer", json=body, headers=headers) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise OfferRefused(resp.status, answer)
        self.session_id, self.answer_sdp = answer["session_id"], answer["sdp"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        return answer

    async def wait_open(self, timeout: float = 20.0) -> None:
        await self.wait_for(lambda: self.control_ch.readyState == "open" and self.tokens_ch.readyState == "open",
                            timeout, "data channels open")

    async def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; control: "
                                     f"{[m for _, m in self.control][-12:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))

    def controls(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.control if m.get("type") == kind]

    def send(self, msg: dict[str, Any] | str | bytes) -> None:
        self.control_ch.send(json.dumps(msg) if isinstance(msg, dict) else msg)

    async def ping(self, ping_id: int, timeout: float = 10.0) -> dict[str, Any]:
        """Round trip on `control`: everything sent before it has been handled when the pong comes."""
        self.send({"type": "ping", "id": ping_id})
        return await self.wait_for(lambda: next((m for m in self.controls("pong") if m.get("id") == ping_id), None),
                                   timeout, f"pong {ping_id}")

    def audio_frames(self, since: float = 0.0) -> list[tuple[float, float]]:
        """Received frames carrying sound (not silence) that arrived after `since`."""
        return [(t, rms) for t, rms in self.audio if t > since and rms > SILENCE_RMS]

    async def close(self) -> None:
        self.mic.stop()
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
