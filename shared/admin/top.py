"""`voxbus top`: a live terminal view of pools, workers, queues, sessions and DLQs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.config import Config

import argparse
import asyncio
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else redis://127.0.0.1:6379/0)")
    p.add_argument("--pools", help="pools TOML file (shows configured pools with no worker too)")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (for scripts)")


async def snapshot(redis: aioredis.Redis, config: Config | None = None, sessions_limit: int = 10) -> Any:
    """A rich renderable of the current state."""
    from rich.console import Group
    from rich.table import Table

    from shared.admin.exporter import collect_once
    from shared.admin.recording import recent_sessions
    from shared.protocol import Keys

    rows = await collect_once(redis, config)
    pools = Table(title="pools", expand=False)
    for col in ("pool", "stage", "gpu", "workers", "slots busy", "lag", "pending", "oldest ms", "p50 ms", "p99 ms", "dlq"):
        pools.add_column(col, justify="left" if col in ("pool", "stage", "gpu") else "right")
    for r in rows:
        pools.add_row(r["pool"], r["stage"], r["gpu_type"], str(r["workers"]), f"{r['slots_busy']}/{r['slots_total']}",
                      str(r["lag"]), str(r["pending"]), f"{r['oldest_pending_ms']:.0f}", f"{r['job_p50_ms']:.0f}",
                      f"{r['job_p99_ms']:.0f}", str(r["dlq"]))
    sessions = Table(title="recent sessions", expand=False)
    for col in ("session", "started", "age s", "audio frames", "events"):
        sessions.add_column(col)
    now = time.time()
    for sid, started in await recent_sessions(redis, sessions_limit):
        pipe = redis.pipeline(transaction=False)
        pipe.xlen(Keys.audio_in(sid))
        pipe.xlen(Keys.events(sid))
        frames, events = await pipe.execute()
        sessions.add_row(sid, time.strftime("%H:%M:%S", time.localtime(started)), f"{now - started:.0f}", str(frames), str(events))
    dlq = await redis.xlen(Keys.DLQ)
    footer = f"bridge DLQ: {dlq}   pool DLQs: {sum(r['dlq'] for r in rows)}   {time.strftime('%H:%M:%S')}"
    return Group(pools, sessions, footer)


async def _main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from shared.config import load_config
    from shared.redis_conn import connect, redis_url_from_env, wait_ready

    url = args.redis_url or redis_url_from_env()
    redis = connect(url)
    await wait_ready(redis, 10, url)
    config = load_config(args.pools) if args.pools else None
    console = Console(width=None if Console().is_terminal else 140)
    try:
        if args.once:
            console.print(await snapshot(redis, config))
            return 0
        with Live(await snapshot(redis, config), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                await asyncio.sleep(args.interval)
                live.update(await snapshot(redis, config))
    finally:
        await redis.aclose()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 0
