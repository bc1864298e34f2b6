"""Benchmark: a worker killed with kill -9 mid-job; how soon its jobs finish elsewhere.

Starts `--workers` real `voxbus worker` processes for a fresh pool (synthetic
LLM engine, fixed step: one job is `--tokens` x `--step-ms`, ~0.5 s by
default). Each trial enqueues `--jobs` jobs (one session each), waits until
every job is streaming, kill -9s the worker holding the most of them, starts a
replacement, and waits for every job to end.

- `reclaim_s`: from the kill (taken right after `os.kill` returns) to the
  moment a reader sees the final token of the last of the killed worker's
  jobs; the worst trial is reported. The reader is what the bridge runs: one
  `StreamMux` XREAD loop over every session's token stream, with timestamps
  from this process's clock.
- `duplicates`: (turn, seq) token outputs that reader received more than once
  (a caller would have seen them twice).
- `lost`: jobs that did not end with a final token within the deadline, or
  whose tokens have a gap, or whose text differs from an uninterrupted run.

The anchor, measured in the same run: `job_s`, an uninterrupted job from
enqueue to its final token, and the runtime's detection bound (a dead worker
is noticed `ttl_s` after its last heartbeat, checked every `reap_interval_s`).
The floor of `reclaim_s` is about `ttl_s - heartbeat_s + job_s`: the re-run
starts from the first token.

    .venv/bin/python ops/bench/recovery.py --json

Every key the benchmark creates is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from shared import registry
from shared.bus import StreamMux
from shared.jobs import enqueue
from shared.protocol import ChatMessage, Keys, LlmJob, TokenChunk, decode_entry, encode
from shared.redis_conn import DEFAULT_URL, connect
from workers.runtime import Worker

TARGET = {"reclaim_s": 2.0, "lost": 0, "duplicates": 0}


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    worker_id: str = ""


@dataclass
class Reader:
    """Follows token streams like the bridge: records when each (session, turn, seq) arrives."""

    mux: StreamMux
    seen: dict[tuple[str, int, int], int] = field(default_factory=dict)
    final_at: dict[str, float] = field(default_factory=dict)
    streaming: dict[str, int] = field(default_factory=dict)

    async def run(self) -> None:
        while True:
            for item in await self.mux.read():
                msg = item.msg
                if not isinstance(msg, TokenChunk):
                    continue
                key = (msg.session, msg.turn, msg.seq)
                self.seen[key] = self.seen.get(key, 0) + 1
                self.streaming[msg.session] = self.streaming.get(msg.session, 0) + 1
                if msg.final:
                    self.final_at.setdefault(msg.session, time.time())

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.seen.values())


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.pool = f"bench-recovery-{self.run_id}"
        self.redis: aioredis.Redis = connect(args.redis_url)
        self.tmp = tempfile.TemporaryDirectory(prefix="voxbus-recovery-")
        self.pools_file = Path(self.tmp.name) / "pools.toml"
        self.procs: list[Proc] = []
        self.sessions: list[str] = []

    def write_pools(self) -> None:
        a = self.args
        self.pools_file.write_text(
            f'[pools."{self.pool}"]\nstage = "llm"\nengine = "synthetic"\nslots = {a.slots}\n'
            f"options = {{ step_ms = {a.step_ms}, tokens = {a.tokens} }}\n",
            encoding="utf-8",
        )

    async def start_worker(self) -> Proc:
        voxbus = Path(sys.executable).with_name("voxbus")
        cmd = [str(voxbus)] if voxbus.exists() else [sys.executable, "-m", "shared.cli"]
        proc = await asyncio.create_subprocess_exec(
            *cmd, "worker", "--pool", self.pool, "--pools", str(self.pools_file), "--redis-url", self.args.redis_url,
            "--drain-timeout", "1", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        p = Proc(proc)
        self.procs.append(p)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"worker exited with {proc.returncode} before registering")
            for rec in await registry.worker_records(self.redis, self.pool):
                if rec.pid == proc.pid:
                    p.worker_id = rec.worker_id
                    return p
            await asyncio.sleep(0.02)
        raise RuntimeError("worker did not register within 60 s")

    async def new_job(self, reader: Reader, name: str) -> tuple[str, str]:
        sid = f"bench-rec-{self.run_id}-{name}"
        self.sessions.append(sid)
        await self.redis.rpush(Keys.ctx(sid), encode(ChatMessage(session=sid, role="user", text="hello there")))
        await reader.mux.add(Keys.tokens(sid), "0-0")
        entry = await enqueue(self.redis, self.pool, LlmJob(session=sid, turn=0))
        return sid, entry

    async def wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            await asyncio.sleep(0.005)

    async def text_of(self, sid: str) -> tuple[str, bool]:
        """The session's reply text and whether its stream is whole (seq 0..n, final last)."""
        raw = await self.redis.xrange(Keys.tokens(sid))
        toks = [decode_entry(f) for _, f in raw]
        whole = bool(toks) and [t.seq for t in toks] == list(range(len(toks))) and toks[-1].final
        return "".join(t.text for t in toks), whole

    async def run(self) -> dict:
        a = self.args
        self.write_pools()
        self.procs = list(await asyncio.gather(*(self.start_worker() for _ in range(a.workers))))
        reader = Reader(StreamMux(self.redis, block_ms=20))
        read_task = asyncio.create_task(reader.run())
        try:
            t0 = time.time()
            ref, _ = await self.new_job(reader, "ref")
            await self.wait(lambda: ref in reader.final_at, 30, "reference job")
            job_s = reader.final_at[ref] - t0
            reference, _ = await self.text_of(ref)

            rng = random.Random(a.seed)
            reclaims: list[float] = []
            lost = killed_jobs = 0
            for trial in range(a.trials):
                jobs = [await self.new_job(reader, f"{trial}-{j}") for j in range(a.jobs)]
                sids = [sid for sid, _ in jobs]
                await self.wait(lambda sids=sids: all(reader.streaming.get(s, 0) >= 3 for s in sids), 30, "jobs streaming")
                # A random phase against the victim's heartbeat (period heartbeat_s), still mid-job.
                await asyncio.sleep(rng.uniform(0, min(0.25, job_s / 2)))
                holders = {}
                for sid, entry in jobs:
                    rows = await self.redis.xpending_range(Keys.pool_jobs(self.pool), self.pool, entry, entry, 1)
                    if rows:
                        holders[sid] = rows[0]["consumer"].decode()
                counts = {p.worker_id: sum(1 for h in holders.values() if h == p.worker_id) for p in self.procs}
                victim = max(self.procs, key=lambda p: counts[p.worker_id])
                victim_sids = [s for s, h in holders.items() if h == victim.worker_id]
                os.kill(victim.proc.pid, signal.SIGKILL)
                killed_at = time.time()
                await victim.proc.wait()
                self.procs.remove(victim)
                replacement = asyncio.create_task(self.start_worker())
                try:
                    await self.wait(lambda sids=sids: all(s in reader.final_at for s in sids), a.deadline_s, "jobs to finish")
                except TimeoutError:
                    pass
                self.procs.append(await replacement)
                killed_jobs += len(victim_sids)
                done = [reader.final_at[s] for s in victim_sids if s in reader.final_at]
                if done:
                    reclaims.append(round(max(done) - killed_at, 3))
                for sid in sids:
                    text, whole = await self.text_of(sid)
                    lost += int(not whole or text != reference)
            return {
                "bench": "recovery",
                "reclaim_s": max(reclaims) if reclaims else None,
                "reclaim_s_trials": reclaims,
                "lost": lost,
                "duplicates": reader.duplicates,
                "trials": a.trials,
                "jobs_per_trial": a.jobs,
                "killed_jobs": killed_jobs,
                "workers": a.workers,
                "slots": a.slots,
                "anchor": {"job_s": round(job_s, 3), **runtime_bounds(), "step_ms": a.step_ms, "tokens": a.tokens},
                "target": TARGET,
                "met": bool(reclaims) and max(reclaims) <= TARGET["reclaim_s"] and lost == 0 and reader.duplicates == 0,
                "process_model": "separate processes: N `voxbus worker` (synthetic engine), this reader/orchestrator; Redis over loopback",
            }
        finally:
            read_task.cancel()
            await asyncio.gather(read_task, return_exceptions=True)
            await reader.mux.aclose()

    async def cleanup(self) -> None:
        for p in self.procs:
            if p.proc.returncode is None:
                p.proc.kill()
                await p.proc.wait()
        keys = Keys.pool_keys(self.pool) + [k async for k in self.redis.scan_iter(match=Keys.worker_pattern(self.pool))]
        keys += [k for sid in self.sessions for k in Keys.session_keys(sid)]
        for i in range(0, len(keys), 500):
            await self.redis.delete(*keys[i : i + 500])
        await self.redis.srem(Keys.POOLS, self.pool)
        await self.redis.aclose()
        self.tmp.cleanup()


def runtime_bounds() -> dict[str, float]:
    """The worker runtime's default heartbeat, ttl and reap interval (what `voxbus worker` uses)."""
    params = inspect.signature(Worker.__init__).parameters
    return {name: params[name].default for name in ("heartbeat_s", "ttl_s", "reap_interval_s")}


async def main(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    try:
        return await bench.run()
    finally:
        await bench.cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or DEFAULT_URL)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--jobs", type=int, default=4, help="jobs per trial (keep <= the survivors' free slots)")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--step-ms", type=float, default=25.0)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--deadline-s", type=float, default=20.0, help="a job not finished this long after the kill is lost")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    result = asyncio.run(main(ns))
    if ns.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v}")
