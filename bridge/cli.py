"""`voxbus bridge`: run a bridge: direct WebRTC (prints the caller page's URL) or a LiveKit Agents worker.

Redis: --redis-url, else $REDIS_URL, else a private embedded one (workers
must use the same Redis; `voxbus up` starts both). Bearer token: --token,
else $VOXBUS_BRIDGE_TOKEN, else a random one, printed with the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

log = logging.getLogger("voxbus.bridge")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pools", help="pools TOML file (default: $VOXBUS_POOLS, else ops/pools/cpu.toml)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else an embedded Redis)")
    p.add_argument("--host", help="listen address (default: [bridge] host of the pools file, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: [bridge] port of the pools file, 8080; 0: any)")
    p.add_argument("--token", help="bearer token callers must present (default: $VOXBUS_BRIDGE_TOKEN, else random)")
    p.add_argument("--transport", choices=["webrtc", "livekit"], default="webrtc",
                   help="webrtc: accept browsers directly (default); livekit: join rooms as an agent "
                        "(LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET)")
    p.add_argument("--health-port", type=int, default=8081, help="livekit transport: health/metrics port (0: any)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus /metrics on this port (0: off; the WebRTC port serves it only with the token)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address for --metrics-port (default loopback; 0.0.0.0 for a scraper on another host)")


async def _main(args: argparse.Namespace) -> int:
    from shared.admin.embedded_redis import redis_url_or_embedded
    from shared.config import load_config

    from .core import Bridge
    from .transports import create

    config = load_config(args.pools)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host)
    async with redis_url_or_embedded(args.redis_url) as redis_url:
        bridge = Bridge(redis_url, config)
        if args.transport == "livekit":
            transport = create("livekit", bridge, port=args.health_port)
        else:
            transport = create("webrtc", bridge, token=args.token, host=args.host, port=args.port)
        await bridge.start()
        try:
            await transport.start()
            if args.transport == "livekit":
                print(f"voxbus bridge: LiveKit worker up for {transport.settings.url}", flush=True)  # type: ignore[attr-defined]
            else:
                print(f"voxbus bridge: open {getattr(transport, 'page_url', '')}", flush=True)
                print(f"voxbus bridge: API token (Authorization: Bearer): {getattr(transport, 'token', '')}", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()

            def on_signal() -> None:
                if stop.is_set() and hasattr(transport, "hurry"):
                    transport.hurry()  # a second signal: hang up now instead of waiting for live calls
                stop.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal)
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(bridge.tasks.failed.wait())}
            if hasattr(transport, "wait"):
                waits.add(asyncio.ensure_future(transport.wait()))
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            for t in done:
                t.result()  # surfaces e.g. an unreachable LiveKit server
        finally:
            await transport.aclose()
            await bridge.aclose()
    if bridge.tasks.failure:
        log.critical("bridge stopped: %s", bridge.tasks.failure)
        return 70  # EX_SOFTWARE: the orchestrator restarts it
    return 0


def run(args: argparse.Namespace) -> int:
    from shared.config import ConfigError
    from shared.models import ModelMissing
    from shared.plugins import UnknownEngine

    try:
        return asyncio.run(_main(args))
    except (ConfigError, ModelMissing, UnknownEngine, RuntimeError, OSError) as exc:
        log.error("%s", exc)
        return 2
