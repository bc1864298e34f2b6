"""Test helpers for the bridge: real worker processes of the CPU pools, a bridge with its WebRTC transport, a caller.

- `shared_workers`: real `voxbus worker` processes for the pools of ops/pools/cpu.toml under unique
  names (the default Redis is shared with other runs), started once per pytest run (tests/bridge's
  `workers` fixture and tests/browser use the same set).
- `running_bridge`: a Bridge (real Silero VAD) plus the WebRTC transport on a free loopback port.
- `RtcClient`: the product's aiortc caller (bridge/caller.py) with the tests' token by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from bridge import caller
from bridge.caller import SILENCE_RMS, OfferRefused, SpeechTrack  # noqa: F401 (re-exported for the tests)
from bridge.core import Bridge
from bridge.transports import rtc_setup
from bridge.transports.webrtc import WebRtcTransport
from shared.config import Config, check_bridge, parse_config
from shared.protocol import Keys
from tests.support.pools import renamed_cpu_pools_toml

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-" + uuid.uuid4().hex[:8]
WORKER_START_TIMEOUT_S = 240.0
_TIME_BASE = fractions.Fraction(1, 48_000)


# ----------------------------------------------------------------------------- worker processes

@dataclass
class WorkerSet:
    pools_file: Path
    pools: dict[str, str]  # stage -> pool name
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def config(self) -> Config:
        cfg = parse_config(tomllib.loads(self.pools_file.read_text()), str(self.pools_file))
        cfg.bridge.offer_burst, cfg.bridge.offer_rate_per_s = 10_000, 1000.0  # every test caller is 127.0.0.1
        return cfg

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs if p.exists())


def start_workers(redis_url: str, workdir: Path) -> WorkerSet:
    suffix = "t" + uuid.uuid4().hex[:8]
    pools_file = workdir / "pools.toml"
    pools_file.write_text(renamed_cpu_pools_toml(suffix))
    ws = WorkerSet(pools_file, {})
    cfg = ws.config()
    ws.pools = {stage: cfg.default_pool(stage).name for stage in cfg.stages}
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
            keys += list(client.scan_iter(match=Keys.worker_pattern(pool), count=1000))
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


def pools_config(**bridge: Any) -> Config:
    """A Config with unique pool names and no workers (for tests that never reach a pool).

    Every test caller shares 127.0.0.1, so the per-address offer limit is lifted unless a test sets it."""
    suffix = "t" + uuid.uuid4().hex[:8]
    cfg = parse_config(tomllib.loads(renamed_cpu_pools_toml(suffix)), "test")
    bridge = {"offer_burst": 10_000, "offer_rate_per_s": 1000.0, **bridge}
    for key, value in bridge.items():
        setattr(cfg.bridge, key, value)
    check_bridge(cfg, "test")  # what a pools file would be refused for, a test cannot set either
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
        await transport.aclose()
        await bridge.aclose()
        await delete_session_keys(redis_url, opened)


async def delete_session_keys(redis_url: str, sids: list[str]) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    try:
        def run() -> None:
            for sid in sids:
                keys = [*Keys.session_keys(sid), Keys.claim(sid)]
                client.delete(*keys)
                client.zrem(Keys.SESSIONS, sid)
        await asyncio.to_thread(run)
    finally:
        client.close()


# ----------------------------------------------------------------------------- client peer

class RtcClient(caller.RtcClient):
    """The product's simulated caller (bridge/caller.py) with the tests' token by default."""

    def __init__(self, base_url: str, token: str | None = TOKEN, **kwargs: Any) -> None:
        super().__init__(base_url, token, **kwargs)


