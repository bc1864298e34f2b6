"""Benchmark: barge-in, from the bridge publishing a cancel to the worker's generator stopping.

Each trial streams one reply from a real worker process, and after a random
number of tokens (at a random phase within a step) publishes a cancel the
way the bridge does (`shared.cancel.publish_cancel`). All times are
`time.time()`, one clock for every process on this machine:

    published  this process, just before publish_cancel (SET + PUBLISH)
    fired      worker: the cancel watch of the job fired (stamped by a task
               awaiting the watch, so it is one or two loop turns late, never early)
    seen       worker: the engine's step loop first observed the cancel, i.e.
               the model step that was running when the cancel came has ended
    closed     worker: the `ts` of the Cancelled event, stamped by the LLM stage
               once the engine's generator has closed

    cancel_ms = (fired - published) + (closed - max(seen, fired))

that is, everything but the model step that was in flight (`step_wait_ms`,
reported apart, at most one step); `stop_ms` is closed - published with it.

How the worker stamps `fired` and `seen`: this file, run with `--child`, is a
worker process running the real runtime (`workers.runtime.Worker`: its cancel
hub, LLM stage and publisher) with the real engine subclassed only to take the
two stamps. For the synthetic engine the watch handed to the engine records
the first time `cancelled` reads true; its step loop reads it right after
each step. The llama.cpp engine checks a stop function in its decode thread
before decoding each next token; the subclass wraps that function. When only
the LLM stage's own between-steps check saw the cancel, no step was running
and `seen` is taken as `fired`. The child writes the stamps to a Redis hash
after the fact, off the measured path.

The anchor, sampled after every trial in the same run: a bare PUBLISH from
this process to a subscriber in the worker process (`pubsub_*`), the floor of
`hop_ms` on this machine at that moment.

The llama.cpp figures are at the top level: the engine exactly as the
`llm-cpu` pool of ops/pools/cpu.toml configures it (bundled SmolLM2-135M on
CPU; `--pools` / `--llm-pool` for another), the synthetic engine's (fixed step time) under `synthetic`. `step_ms` is the
median interval between consecutive tokens as stamped by the worker.

    .venv/bin/python ops/bench/barge_in.py --json

Every key the benchmark creates is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from shared import registry
from shared.bus.entries import redis_py_replies
from shared.cancel import CancelWatch, publish_cancel
from shared.config import PoolConfig, load_config
from shared.jobs import enqueue
from shared.protocol import (
    Cancel,
    Cancelled,
    ChatMessage,
    Keys,
    LlmJob,
    decode_entry,
    encode,
)
from shared.redis_conn import DEFAULT_URL, connect
from shared.stats import percentile

TARGET = {"cancel_p99_ms": 3.0}
LLAMA_MODEL = "bundled:smollm2-135m-instruct"
LLAMA_PROMPT = "Tell me a long story about a dragon who learns to fly, with many details."


# --------------------------------------------------------------------------
# Worker side (--child): the real runtime with stamping engine subclasses
# --------------------------------------------------------------------------


def stamp_key(session: str, turn: int) -> str:
    return f"{session}:{turn}"


class Stamps:
    """"session:turn" -> {"fired": t, "seen": t}; `seen` may be written from a decode thread."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()

    def stamp(self, rid: str, what: str) -> None:
        now = time.time()
        with self.lock:
            self.data.setdefault(rid, {}).setdefault(what, now)

    def watch_fire(self, watch: CancelWatch) -> None:
        key = stamp_key(watch.session, watch.turn)
        waiter = asyncio.ensure_future(watch.wait())
        waiter.add_done_callback(lambda f: f.cancelled() or self.stamp(key, "fired"))

    def take_complete(self, settle_s: float = 0.5) -> dict[str, dict[str, float]]:
        """Stamps ready to report: both taken, or `fired` only and old enough that no step
        loop will ever see it (the LLM stage itself noticed the cancel between two steps)."""
        cutoff = time.time() - settle_s
        with self.lock:
            done = {k: v for k, v in self.data.items() if ("seen" in v and "fired" in v) or v.get("fired", 1e100) < cutoff}
            for k in done:
                del self.data[k]
        return done


class SeenWatch:
    """Hands the engine a watch that stamps the first time its step loop sees `cancelled`."""

    def __init__(self, inner: CancelWatch, stamps: Stamps) -> None:
        self._inner, self._stamps = inner, stamps
        self._key = stamp_key(inner.session, inner.turn)

    @property
    def cancelled(self) -> bool:
        if self._inner.cancelled:
            self._stamps.stamp(self._key, "seen")
            return True
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def stamping_engine(name: str, options: dict[str, Any], stamps: Stamps) -> Any:
    if name == "synthetic":
        from workers.llm.synthetic import SyntheticLlm

        class StampedSynthetic(SyntheticLlm):
            def stream(self, messages, *, request_id, max_tokens, watch):  # type: ignore[no-untyped-def]
                if watch is not None:
                    stamps.watch_fire(watch)
                    watch = SeenWatch(watch, stamps)
                return super().stream(messages, request_id=request_id, max_tokens=max_tokens, watch=watch)

        return StampedSynthetic(**options)
    if name == "llamacpp":
        from workers.llm.llamacpp import LlamaCppLlm

        class StampedLlamaCpp(LlamaCppLlm):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.keys: dict[str, str] = {}  # request id -> stamp key (_run sees only the id)

            def stream(self, messages, *, request_id, max_tokens, watch):  # type: ignore[no-untyped-def]
                if watch is not None:
                    stamps.watch_fire(watch)
                    self.keys[request_id] = stamp_key(watch.session, watch.turn)
                return super().stream(messages, request_id=request_id, max_tokens=max_tokens, watch=watch)

            def _run(self, llm, chat, max_tokens, should_stop, emit, stats):  # type: ignore[no-untyped-def]
                key = self.keys.pop(stats.request_id, None)

                def stop() -> bool:
                    if should_stop():
                        if key is not None:
                            stamps.stamp(key, "seen")
                        return True
                    return False

                return super()._run(llm, chat, max_tokens, stop, emit, stats)

        return StampedLlamaCpp(**options)
    raise SystemExit(f"unknown engine {name!r}")


async def child_main(args: argparse.Namespace) -> None:
    from workers.runtime import Worker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = json.loads(args.options)
    stamps = Stamps()
    pool = PoolConfig(stage="llm", engine=args.engine, options=options, slots=1, name=args.pool)
    worker = Worker(args.redis_url, pool, engine=stamping_engine(args.engine, options, stamps))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = connect(args.redis_url)

    async def flush() -> None:
        while True:
            await asyncio.sleep(0.02)
            done = stamps.take_complete()
            if done:
                await redis.hset(args.stamps_key, mapping={rid: json.dumps(v) for rid, v in done.items()})

    async def probes() -> None:
        """The anchor: bare PUBLISH -> receipt in this process, on its own connection."""
        pubsub = redis.pubsub()
        await pubsub.subscribe(args.stamps_key + ":probe")
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if msg is not None:
                await redis.hset(args.stamps_key + ":probes", msg["data"], repr(time.time()))

    helpers = [asyncio.create_task(flush()), asyncio.create_task(probes())]
    for task in helpers:
        task.add_done_callback(
            lambda t: t.cancelled() or t.exception() is None or print(f"bench helper died: {t.exception()!r}", file=sys.stderr)
        )
    try:
        await worker.run(stop)
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await redis.aclose()


# --------------------------------------------------------------------------
# Bridge side: trials
# --------------------------------------------------------------------------




def stream_entries(reply: Any) -> list[Any]:
    """The entries of a one-stream XREAD reply (shared.bus.entries knows every shape redis-py gives)."""
    pairs = redis_py_replies(reply)
    return pairs[0][1] if pairs else []


class Run:
    def __init__(self, redis: aioredis.Redis, url: str, engine: str, options: dict[str, Any], run_id: str) -> None:
        self.redis, self.url, self.engine, self.options = redis, url, engine, options
        self.pool = f"bench-bargein-{engine}-{run_id}"
        self.stamps_key = Keys.bench(f"bargein:{run_id}:{engine}:stamps")
        self.run_id = run_id
        self.sessions: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.log: Any = None

    async def start(self, timeout: float = 120.0) -> None:
        # A file, not a pipe: a chatty child never blocks on it. Closed in close().
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--child", "--engine", self.engine, "--pool", self.pool,
            "--options", json.dumps(self.options), "--stamps-key", self.stamps_key, "--redis-url", self.url,
            stdin=asyncio.subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{self.engine} worker exited with {self.proc.returncode}: {err}")
            if any(r.pid == self.proc.pid for r in await registry.worker_records(self.redis, self.pool)):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.engine} worker did not register within {timeout:.0f} s")

    async def trial(self, i: int, rng: random.Random, step_s: float, prompt: str, max_tokens: int) -> dict | None:
        sid = f"bench-bi-{self.run_id}-{self.engine}-{i}"
        self.sessions.append(sid)
        await self.redis.rpush(Keys.ctx(sid), encode(ChatMessage(session=sid, role="user", text=prompt)))
        tokens_key, events_key = Keys.tokens(sid), Keys.events(sid)
        await enqueue(self.redis, self.pool, LlmJob(session=sid, turn=0, max_tokens=max_tokens))
        want = rng.randint(2, 6)
        last, got, final = "0-0", 0, False
        while got < want and not final:
            entries = stream_entries(await self.redis.xread({tokens_key: last}, block=5000))
            if not entries:
                raise TimeoutError(f"no tokens from the {self.engine} worker")
            for entry_id, fields in entries:
                last = entry_id
                tok = decode_entry(fields)
                got += 1
                final = final or tok.final
        if final:
            return None  # the reply ended before the cancel: nothing to measure
        await asyncio.sleep(rng.uniform(0, step_s))
        published = time.time()
        await publish_cancel(self.redis, Cancel(session=sid, turn=0))
        cancelled = await self._cancelled(events_key)
        stamps = await self._stamps(stamp_key(sid, 0))
        toks = [decode_entry(f) for _, f in await self.redis.xrange(tokens_key)]
        fired, closed = stamps["fired"], cancelled.ts
        seen = stamps.get("seen", fired)  # no "seen": the stage saw it between steps, none was running
        return {
            "cancel_ms": ((fired - published) + (closed - max(seen, fired))) * 1000,
            "hop_ms": (fired - published) * 1000,
            "close_ms": (closed - max(seen, fired)) * 1000,
            "step_wait_ms": max(0.0, seen - fired) * 1000,
            "stop_ms": (closed - published) * 1000,
            "steps": [(b.ts - a.ts) * 1000 for a, b in itertools.pairwise(toks)],
        }

    async def _cancelled(self, events_key: str, timeout: float = 10.0) -> Cancelled:
        last = "0-0"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry_id, fields in stream_entries(await self.redis.xread({events_key: last}, block=1000)):
                last = entry_id
                msg = decode_entry(fields)
                if isinstance(msg, Cancelled):
                    return msg
        raise TimeoutError("no Cancelled event")

    async def _stamps(self, rid: str, timeout: float = 5.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = await self.redis.hget(self.stamps_key, rid)
            if raw:
                return json.loads(raw)
            await asyncio.sleep(0.01)
        raise TimeoutError(f"the worker wrote no stamps for {rid}")

    async def measure(self, trials: int, step_s: float, prompt: str, max_tokens: int, seed: int) -> dict:
        rng = random.Random(seed)
        rows, probes = [], []
        for i in range(trials):
            row = await self.trial(i, rng, step_s, prompt, max_tokens)
            if row is not None:
                rows.append(row)
            probes.append(await self.probe(i))
        steps = [s for r in rows for s in r["steps"]]
        out: dict[str, Any] = {
            "cancel_p50_ms": percentile([r["cancel_ms"] for r in rows], 50),
            "cancel_p99_ms": percentile([r["cancel_ms"] for r in rows], 99),
            "step_ms": round(statistics.median(steps), 3) if steps else None,
            "trials": len(rows),
            "skipped_trials": trials - len(rows),
        }
        for name in ("hop_ms", "close_ms", "step_wait_ms", "stop_ms"):
            values = [r[name] for r in rows]
            out[name.replace("_ms", "_p50_ms")] = percentile(values, 50)
            out[name.replace("_ms", "_p99_ms")] = percentile(values, 99)
        out["cancel_p90_ms"] = percentile([r["cancel_ms"] for r in rows], 90)
        out["pubsub_p50_ms"] = percentile(probes, 50)
        out["pubsub_p99_ms"] = percentile(probes, 99)
        return out

    async def probe(self, i: int) -> float:
        """One bare PUBLISH from here to the worker process's own subscriber, in ms."""
        sent = time.time()
        await self.redis.publish(self.stamps_key + ":probe", str(i))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = await self.redis.hget(self.stamps_key + ":probes", str(i))
            if got:
                return (float(got) - sent) * 1000
            await asyncio.sleep(0.002)
        raise TimeoutError("the worker process did not receive a probe")

    async def aclose(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        keys = [*Keys.pool_keys(self.pool), self.stamps_key, self.stamps_key + ":probes"]
        keys += [k async for k in self.redis.scan_iter(match=Keys.worker_pattern(self.pool))]
        keys += [k for sid in self.sessions for k in Keys.session_keys(sid)]
        for i in range(0, len(keys), 500):
            await self.redis.delete(*keys[i : i + 500])
        await self.redis.srem(Keys.POOLS, self.pool)
        if self.log is not None:
            self.log.close()


async def run_engine(redis, args, engine: str, options: dict[str, Any], trials: int, step_s: float, prompt: str) -> dict:
    run = Run(redis, args.redis_url, engine, options, uuid.uuid4().hex[:8])
    try:
        await run.start()
        return await run.measure(trials, step_s, prompt, args.max_tokens, args.seed)
    finally:
        await run.aclose()


def llama_unavailable(model: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if importlib.util.find_spec("workers.llm.llamacpp") is None:
        return "workers/llm/llamacpp.py does not exist"
    from shared.models import ModelMissing, resolve

    try:
        resolve(model)
    except ModelMissing as exc:
        return str(exc)
    return None


async def main(args: argparse.Namespace) -> dict:
    redis = connect(args.redis_url)
    try:
        synthetic = await run_engine(
            redis, args, "synthetic", {"step_ms": args.step_ms, "tokens": 200}, args.trials,
            args.step_ms / 1000, "hello there",
        )
        pool = load_config(args.pools).pool(args.llm_pool)
        if pool.engine != "llamacpp":
            raise SystemExit(f"pool {pool.name} runs {pool.engine!r}, not llamacpp")
        llama_options = {"model": LLAMA_MODEL, **pool.options}
        result: dict[str, Any] = {"bench": "barge_in", "engine": "llamacpp", "model": llama_options["model"],
                                  "pool": pool.name, "options": llama_options}
        why = llama_unavailable(llama_options["model"])
        if why is None:
            result |= await run_engine(redis, args, "llamacpp", llama_options, args.llama_trials, 0.01, LLAMA_PROMPT)
        else:
            result |= {"cancel_p50_ms": None, "cancel_p99_ms": None, "step_ms": None, "trials": 0, "unavailable": why}
        result["synthetic"] = {"engine": "synthetic", "configured_step_ms": args.step_ms, **synthetic}
        result["target"] = TARGET
        result["anchor"] = {
            "pubsub_p50_ms": result.get("pubsub_p50_ms") or synthetic["pubsub_p50_ms"],
            "pubsub_p99_ms": result.get("pubsub_p99_ms") or synthetic["pubsub_p99_ms"],
            "what": "pubsub_*: a bare PUBLISH from this process to a subscriber in the worker process, "
            "sampled after every trial (the floor of hop_ms, which also holds publish_cancel's SET); "
            "step_ms: one decode step, what stop_ms includes and cancel_ms excludes",
        }
        p99s = [p for p in (result["cancel_p99_ms"], synthetic["cancel_p99_ms"]) if p is not None]
        result["met"] = bool(p99s) and max(p99s) <= TARGET["cancel_p99_ms"]
        result["process_model"] = "separate processes: worker (real runtime + engine, stamping subclass) and this bridge-side publisher"
        return result
    finally:
        await redis.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or DEFAULT_URL)
    p.add_argument("--trials", type=int, default=200, help="synthetic-engine trials")
    p.add_argument("--llama-trials", type=int, default=300,
                   help="llama.cpp trials (a p99 of 100 samples is their second-worst: too noisy)")
    p.add_argument("--step-ms", type=float, default=20.0, help="the synthetic engine's step time")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--pools", help="pools file whose llama.cpp pool is measured (default: ops/pools/cpu.toml)")
    p.add_argument("--llm-pool", default="llm-cpu", help="that pool's name; its engine options are used as they are")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    # worker-process mode (started by the benchmark itself)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--pool", help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--stamps-key", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if ns.child:
        asyncio.run(child_main(ns))
        sys.exit(0)
    res = asyncio.run(main(ns))
    if ns.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=2))
