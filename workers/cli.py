"""`voxbus worker --pool NAME`: run one pool's worker process until SIGTERM / Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

log = logging.getLogger("voxbus.worker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True, help="pool name from the pools file")
    p.add_argument("--pools", help="pools TOML file (default: $VOXBUS_POOLS, else ops/pools/cpu.toml)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else redis://127.0.0.1:6379/0)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address for --metrics-port (default loopback; 0.0.0.0 for a scraper on another host)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds running jobs may finish on SIGTERM")


async def _main(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from shared.config import load_config
    from shared.redis_conn import redis_url_from_env
    from workers.runtime import Worker

    pool = load_config(args.pools).pool(args.pool)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_host)
    worker = Worker(args.redis_url or redis_url_from_env(), pool, drain_timeout_s=args.drain_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.run(stop)
    if worker.failure:
        log.critical("worker %s stopped: %s", worker.id, worker.failure)
        return 70  # EX_SOFTWARE: the orchestrator restarts it
    return 0


def run(args: argparse.Namespace) -> int:
    import faulthandler

    from shared.config import ConfigError
    from shared.models import ModelMissing
    from shared.plugins import UnknownEngine

    # A native engine dying by a signal (SIGILL from a library built for another CPU, SIGSEGV)
    # prints the Python stack of every thread first, so the log shows which call it was.
    faulthandler.enable()
    try:
        return asyncio.run(_main(args))
    except (ConfigError, ModelMissing, UnknownEngine, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
