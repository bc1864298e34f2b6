"""Opening Redis connections: URL parsing (TLS, ACL users), retries, redaction for logs."""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("voxbus.redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def redis_url_from_env(default: str | None = DEFAULT_URL) -> str | None:
    return os.environ.get("REDIS_URL") or default


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A redis-py asyncio client for `url` (redis://, rediss://, unix://; user:password@ for ACL).

    Commands are retried with exponential back-off on connection errors, so a
    Redis restart costs a pause, not a crash.
    """
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=8))
    kwargs.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError, ConnectionResetError])
    kwargs.setdefault("health_check_interval", 15)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("socket_connect_timeout", 5)
    return aioredis.Redis.from_url(url, **kwargs)


async def wait_ready(client: aioredis.Redis, timeout: float = 10.0, url: str = "") -> None:
    """PING until Redis answers or raise a clear error naming the (redacted) URL."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Exception | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            await client.ping()
            return
        except TRANSIENT_ERRORS as exc:
            last = exc
            await asyncio.sleep(0.1)
    raise RuntimeError(f"Redis at {redact_url(url) or 'the configured URL'} did not answer within {timeout:.0f}s: {last}")


class Backoff:
    """Exponential back-off with a cap, for loops that must survive Redis restarts."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base, self.cap, self._n = base, cap, 0

    async def sleep(self) -> None:
        await asyncio.sleep(min(self.cap, self.base * (2**self._n)))
        self._n += 1

    def reset(self) -> None:
        self._n = 0
