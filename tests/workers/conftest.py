"""Fixtures for worker tests: a pools file per test and real `voxbus worker` processes.

`cluster` writes the test's pools (names carry the test's uid) to a TOML file
under tmp_path and starts worker processes from it, exactly as an operator
would (`voxbus worker --pool NAME --pools FILE --redis-url URL`). Every process
it started is killed at teardown; each worker's log lands in tmp_path and is
quoted when a worker does not come up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis

from pools_toml import pools_toml
from shared.protocol import Keys
from shared import registry


def _voxbus_command() -> list[str]:
    script = Path(sys.executable).with_name("voxbus")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shared.cli"]


@dataclass
class WorkerProc:
    pool: str
    proc: asyncio.subprocess.Process
    log_path: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        """kill -9: no drain, no deregistration, no acks."""
        os.kill(self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


@dataclass
class Cluster:
    redis: aioredis.Redis
    redis_url: str
    tmp_path: Path
    uid: str
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    procs: list[WorkerProc] = field(default_factory=list)

    @property
    def pools_file(self) -> Path:
        return self.tmp_path / "pools.toml"

    def name(self, suffix: str) -> str:
        return f"t{self.uid}-{suffix}"

    def pool(self, suffix: str, *, stage: str = "llm", engine: str = "synthetic", **table: Any) -> str:
        """Add a pool to this test's pools file; returns its (unique) name. LLM pools get no spoken-reply
        budget unless the test gives one: these tests count the synthetic engine's every token."""
        name = self.name(suffix)
        if stage == "llm":
            table.setdefault("reply", {"soft_tokens": 100_000, "max_sentences": 100_000, "max_tokens": 100_000})
        self.pools[name] = {"stage": stage, "engine": engine, **table}
        self.pools_file.write_text(pools_toml(self.pools), encoding="utf-8")
        return name

    async def start(self, pool: str, *, drain_timeout: float = 5.0, ready_timeout: float = 30.0) -> WorkerProc:
        """Start a worker process of `pool` and wait until it is in the registry."""
        log_path = self.tmp_path / f"worker-{len(self.procs)}-{pool}.log"
        log = await asyncio.to_thread(log_path.open, "wb")
        with log:
            proc = await asyncio.create_subprocess_exec(
                *_voxbus_command(), "worker", "--pool", pool, "--pools", str(self.pools_file),
                "--redis-url", self.redis_url, "--drain-timeout", str(drain_timeout),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        worker = WorkerProc(pool, proc, log_path)
        self.procs.append(worker)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        while loop.time() < deadline:
            if not worker.alive:
                raise AssertionError(f"worker of {pool} exited with {proc.returncode}:\n{worker.log_tail()}")
            for rec in await registry.worker_records(self.redis, pool):
                if rec.pid == proc.pid:
                    worker.worker_id = rec.worker_id
                    return worker
            await asyncio.sleep(0.02)
        raise AssertionError(f"worker of {pool} not registered after {ready_timeout}s:\n{worker.log_tail()}")

    async def aclose(self) -> None:
        for worker in self.procs:
            if worker.alive:
                worker.kill()
                await worker.proc.wait()
        if self.pools:
            await self.redis.srem(Keys.POOLS, *self.pools)


@pytest_asyncio.fixture
async def cluster(redis: aioredis.Redis, redis_url: str, tmp_path: Path, uid: str) -> AsyncIterator[Cluster]:
    c = Cluster(redis, redis_url, tmp_path, uid)
    try:
        yield c
    finally:
        await c.aclose()
