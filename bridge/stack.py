"""The local stack behind `voxbus up` and `voxbus demo`: Redis, one worker per pool, the bridge.

Workers run as child processes (model inference then uses every core, and a
worker crash cannot take the bridge down); the bridge runs in this process.
Every component reports a one-line status; one that fails to start is named
with the tail of its output and what to do about it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shared.admin.embedded_redis import redis_url_or_embedded
from shared.config import ALL_STAGES, STAGES, Config, PoolConfig, load_config
from shared.exits import describe_exit
from shared.redis_conn import connect, redact_url
from shared.tasks import finish_task

log = logging.getLogger("voxbus.stack")


class StackError(RuntimeError):
    """A component that did not start; the message names it and what to do."""


@dataclass
class WorkerProcess:
    pool: str
    stage: str
    proc: asyncio.subprocess.Process
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))
    ready_at: float | None = None
    pumping: asyncio.Task[None] | None = None  # copies its output into `output` (ends with the process)

    async def pump(self, echo: bool) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            if echo:
                print(f"  [{self.pool}] {line}", file=sys.stderr)


def status(component: str, state: str, detail: str = "") -> None:
    print(f"voxbus: {component:<10} {state:<8} {detail}", file=sys.stderr, flush=True)


def pools_to_start(config: Config, only: list[str] | None = None, *, check: bool = True) -> list[PoolConfig]:
    """Every pool of the file (or those named in `only`), pipeline order; each stage in use needs one."""
    if only:
        unknown = [name for name in only if name not in config.pools]
        if unknown:
            raise StackError(f"--only names pools that are not in {config.source}: {', '.join(unknown)} "
                             f"(have: {', '.join(sorted(config.pools))})")
        pools = [config.pools[name] for name in only]
    else:
        pools = list(config.pools.values())
    pools.sort(key=lambda p: ALL_STAGES.index(p.stage))
    served = {p.stage for p in pools}
    needed = [s for s in STAGES if s not in served] + (["eot"] if config.bridge.eot != "none" and "eot" not in served else [])
    if needed and check:
        raise StackError(f"no pool is started for stage(s) {', '.join(needed)}: add one to --only")
    return pools


async def start_workers(redis_url: str, config: Config, pools_file: str | None, *, only: list[str] | None = None,
                        verbose: bool = False, timeout_s: float = 600.0, check: bool = True) -> list[WorkerProcess]:
    """One worker process per pool of the file (or of `only`); returns once all are registered.
    `check`: refuse a selection that leaves a stage the bridge needs without a pool."""
    from shared import registry

    procs: list[WorkerProcess] = []
    env = dict(os.environ, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    for pool in pools_to_start(config, only, check=check):
        stage = pool.stage
        args = [sys.executable, "-m", "shared.cli", "worker", "--pool", pool.name]
        if pools_file:
            args += ["--pools", str(pools_file)]
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        wp = WorkerProcess(pool.name, stage, proc)
        wp.pumping = asyncio.create_task(wp.pump(verbose), name=f"pump-{pool.name}")
        procs.append(wp)
        status(f"{stage}", "starting", f"pool {pool.name} ({pool.gpu_type}): {pool.engine} {pool.options.get('model', '')}")
    redis = connect(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.ready_at is None for p in procs):
            for p in procs:
                if p.ready_at is not None:
                    continue
                if p.proc.returncode is not None:
                    await asyncio.sleep(0.2)  # the pump may still hold the last lines (a fault handler's traceback)
                    tail = "\n    ".join(list(p.output)[-12:])
                    advice = ("" if p.proc.returncode < 0 else
                              "Check the pool's engine options in the pools file, that the model packages are installed "
                              f"(./ops/dev setup), and run `voxbus worker --pool {p.pool}` alone to see the full error.")
                    raise StackError(
                        f"the {p.stage} worker (pool {p.pool}) {describe_exit(p.proc.returncode)} while starting:\n"
                        f"    {tail}\n{advice}".rstrip())
                if await registry.live_worker_ids(redis, p.pool):
                    p.ready_at = time.monotonic()
                    status(p.stage, "ready", f"pool {p.pool} (pid {p.proc.pid})")
            if time.monotonic() > deadline:
                late = ", ".join(p.pool for p in procs if p.ready_at is None)
                raise StackError(f"workers {late} did not become ready within {timeout_s:.0f}s (model load too slow?)")
            await asyncio.sleep(0.1)
    except BaseException:
        await stop_workers(procs)
        raise
    finally:
        await redis.aclose()
    return procs


async def stop_workers(procs: list[WorkerProcess], timeout_s: float = 10.0) -> None:
    for p in procs:
        if p.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.terminate()
    for p in procs:
        try:
            await asyncio.wait_for(p.proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
            await p.proc.wait()
        if p.pumping is not None:
            await finish_task(p.pumping, grace_s=1.0)


@dataclass
class Stack:
    redis_url: str
    config: Config
    workers: list[WorkerProcess]
    bridge: Any  # bridge.core.Bridge (imported lazily: the worker image has no bridge)
    transport: object
    page_url: str
    token: str


@contextlib.asynccontextmanager
async def local_stack(pools_file: str | None = None, redis_url: str | None = None, *, host: str = "127.0.0.1",
                      port: int = 0, token: str | None = None, verbose: bool = False,
                      only: list[str] | None = None) -> AsyncIterator[Stack]:
    """Redis (embedded unless given) + one worker per pool + the bridge with the direct WebRTC transport."""
    from bridge.core import Bridge
    from bridge.transports.webrtc import WebRtcTransport

    config = load_config(pools_file)
    async with redis_url_or_embedded(redis_url) as url:
        status("redis", "ready", redact_url(url))
        workers = await start_workers(url, config, pools_file, only=only, verbose=verbose)
        bridge = Bridge(url, config)
        transport = None
        try:
            status("bridge", "starting", "Silero VAD + direct WebRTC")
            await bridge.start()
            transport = WebRtcTransport(bridge, config.bridge, host=host, port=port, token=token)
            await transport.start()
            status("bridge", "ready", transport.page_url)
            yield Stack(url, config, workers, bridge, transport, transport.page_url, transport.token)
        finally:
            if transport is not None:
                await transport.aclose()
            await bridge.aclose()
            await stop_workers(workers)
            status("stack", "stopped")
