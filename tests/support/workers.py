"""Helpers for worker tests: seed sessions, enqueue jobs, read what workers wrote; a pools file per test
and real `voxbus worker` processes started from it, exactly as an operator would (`Cluster`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from shared import registry
from shared.jobs import enqueue
from shared.protocol import (
    AnyMessage,
    ChatMessage,
    Keys,
    LlmJob,
    TokenChunk,
    TurnMark,
    decode_entry,
    encode,
    turn_range,
)
from tests.support.polling import wait_until
from tests.support.pools import pools_toml

T = TypeVar("T")


async def start_session(redis: aioredis.Redis, sid: str, user_text: str | None = "hello there") -> None:
    """A context with a system prompt and (unless None) one user message."""
    msgs = [ChatMessage(session=sid, role="system", text="You are terse.")]
    if user_text is not None:
        msgs.append(ChatMessage(session=sid, role="user", text=user_text, turn=0))
    await redis.rpush(Keys.ctx(sid), *(encode(m) for m in msgs))


async def enqueue_llm(redis: aioredis.Redis, pool: str, sid: str, turn: int = 0, max_tokens: int = 256) -> str:
    return await enqueue(redis, pool, LlmJob(session=sid, turn=turn, max_tokens=max_tokens))


async def tokens(redis: aioredis.Redis, sid: str, turn: int = 0) -> list[TokenChunk]:
    lo, hi = turn_range(turn)
    return [decode_entry(fields) for _, fields in await redis.xrange(Keys.tokens(sid), lo, hi)]


async def events(redis: aioredis.Redis, sid: str) -> list[AnyMessage]:
    return [decode_entry(fields) for _, fields in await redis.xrange(Keys.events(sid))]




async def wait_tokens(redis: aioredis.Redis, sid: str, turn: int, n: int, timeout: float = 15.0) -> list[TokenChunk]:
    async def enough() -> list[TokenChunk]:
        toks = await tokens(redis, sid, turn)
        return toks if len(toks) >= n else []

    return await wait_until(enough, timeout, f"{n} tokens of {sid} turn {turn}")


async def wait_final(redis: aioredis.Redis, sid: str, turn: int = 0, timeout: float = 15.0) -> list[TokenChunk]:
    async def final() -> list[TokenChunk]:
        toks = await tokens(redis, sid, turn)
        return toks if toks and toks[-1].final else []

    return await wait_until(final, timeout, f"the final token of {sid} turn {turn}")


def complete_text(toks: list[TokenChunk]) -> str:
    """The reply text, after checking the stream is whole: seq 0..n, each once, final last."""
    seqs = [(t.turn, t.seq) for t in toks]
    assert len(set(seqs)) == len(seqs), f"duplicate (turn, seq) outputs: {seqs}"
    assert [t.seq for t in toks] == list(range(len(toks))), f"gap in token seqs: {[t.seq for t in toks]}"
    assert toks and toks[-1].final and not any(t.final for t in toks[:-1]), "stream does not end in one final token"
    return "".join(t.text for t in toks)


def marks(evts: list[AnyMessage], turn: int, mark: str) -> list[TurnMark]:
    return [e for e in evts if isinstance(e, TurnMark) and e.turn == turn and e.mark == mark]


async def runs_of(redis: aioredis.Redis, sid: str, turn: int = 0) -> int:
    """How many times a job of `turn` started streaming (each run writes one `ttft` mark)."""
    return len(marks(await events(redis, sid), turn, "ttft"))


async def pending_at(redis: aioredis.Redis, pool: str) -> dict[str, int]:
    """Consumer name -> jobs delivered to it and not yet acked."""
    rows = await redis.xinfo_consumers(Keys.pool_jobs(pool), Keys.pool_group(pool))
    return {_s(r["name"]): int(r["pending"]) for r in rows}


async def holder(redis: aioredis.Redis, pool: str, entry_id: str) -> str | None:
    rows = await redis.xpending_range(Keys.pool_jobs(pool), Keys.pool_group(pool), entry_id, entry_id, 1)
    return _s(rows[0]["consumer"]) if rows else None


async def total_pending(redis: aioredis.Redis, pool: str) -> int:
    info = await redis.xpending(Keys.pool_jobs(pool), Keys.pool_group(pool))
    return int(info["pending"])


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------- worker processes per test

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


