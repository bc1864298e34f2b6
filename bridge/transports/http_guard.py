"""The signaling server's defences against slow, many and greedy clients (aiohttp).

- Read deadlines. A connection must deliver a complete request head within
  `header_timeout_s` of connecting (or of its previous response): aiohttp's
  keep-alive timer closes a connection that is still waiting for a request
  then, whatever trickles in (a slowloris sending a header line every few
  seconds included). Bodies are read under `body_timeout_s` by the handlers
  (`read_body`).
- A connection cap. Past `max_connections` open connections a new one gets a
  plain `503` and is closed before aiohttp sees it: the process needs its
  file descriptors for WebRTC and Redis too.
- Per-client rate limits on offers (`OfferLimiter`, a token bucket per remote
  address): a token holder cannot open calls faster than `rate_per_s` after a
  `burst`.
- Security headers on every response: no referrer, a strict CSP that forbids
  framing, no MIME sniffing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from aiohttp.web_server import Server

from shared import metrics

SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    # The page loads only its own scripts and styles, talks only to its own origin, and may not be framed.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "media-src 'self' blob: mediastream:; img-src 'self' data:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
            b"Connection: close\r\nContent-Length: 66\r\n\r\n"
            b'{"error": "too_many_connections", "message": "try again shortly"}\n')


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every response, errors and static files included."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        metrics.HTTP_REFUSED.labels("max_connections").inc()
        transport.write(_REFUSAL)  # type: ignore[attr-defined]
        transport.close()


class GuardedSite(web.TCPSite):
    """A TCPSite whose protocol factory refuses connections past `max_connections`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, max_connections: int) -> None:
        super().__init__(runner, host, port)
        self.max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server: Server = self._runner.server  # type: ignore[assignment]

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= self.max_connections:
                return _Refuse()
            return server()

        self._server = await asyncio.get_running_loop().create_server(factory, self._host, self._port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The request body, or TimeoutError when the client does not send it in time."""
    async with asyncio.timeout(timeout_s):
        return await request.read()


class OfferLimiter:
    """Token buckets per client address: `burst` offers at once, then `rate_per_s`."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)

    def allow(self, client: str, now: float | None = None) -> float:
        """0.0 when `client` may make an offer now; else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, when = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            self._prune(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else 60.0

    def _prune(self, now: float) -> None:
        if len(self._buckets) > self.max_clients:  # forget clients whose bucket has refilled
            full = self.burst / self.rate if self.rate > 0 else 0.0
            self._buckets = {c: v for c, v in self._buckets.items() if now - v[1] < full}


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


def runner_options(header_timeout_s: float) -> dict[str, Any]:
    """AppRunner arguments: the keep-alive timer doubles as the request-head deadline."""
    return {"access_log": None, "keepalive_timeout": header_timeout_s}
