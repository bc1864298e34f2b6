"""Opening Redis connections: URL parsing (TLS, ACL users), retries, redaction for logs."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("voxbus.redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def redis_url_from_env(default: str | None = DEFAULT_URL) -> str | None:
    return os.environ.get("REDIS_URL") or default


# Query parameters redis-py turns into credentials (`redis://host/0?password=...`).
_SECRET_PARAMS = frozenset({"password"})


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages. Never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: mask everything between :// and the last @
        return re.sub(r"://([^:/@]*):.*@", r"://\1:***@", url)
    # Work on the raw netloc: .hostname/.port drop IPv6 brackets and raise on bad ports.
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class _NotRetried(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class TransientRetry(Retry):
    """Retries connection errors except refused credentials: no back-off heals a wrong
    password, and redis-py's AuthenticationError is a ConnectionError subclass."""

    async def call_with_retry(self, do, fail, *args, **kwargs):  # type: ignore[no-untyped-def]
        async def once():  # type: ignore[no-untyped-def]
            try:
                return await do()
            except AuthenticationError as exc:
                raise _NotRetried(exc) from None

        try:
            return await super().call_with_retry(once, fail, *args, **kwargs)
        except _NotRetried as wrapped:
            raise wrapped.error from None


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A redis-py asyncio client for `url` (redis://, rediss://, unix://; user:password@ for ACL).

    Commands are retried with exponential back-off on connection errors, so a
    Redis restart costs a pause, not a crash.
    """
    kwargs.setdefault("retry", TransientRetry(ExponentialBackoff(cap=1.0, base=0.02), retries=8))
    kwargs.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError, ConnectionResetError])
    kwargs.setdefault("health_check_interval", 15)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("socket_connect_timeout", 5)
    return aioredis.Redis.from_url(url, **kwargs)


async def wait_ready(client: aioredis.Redis, timeout: float = 10.0, url: str = "") -> None:
    """PING until Redis answers or raise a clear error naming the (redacted) URL."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Exception | None = None
    while loop.time() < deadline:
        try:
            # The client's own retries can outlast `timeout`: bound each attempt by what is left.
            await asyncio.wait_for(client.ping(), max(0.05, deadline - loop.time()))
            return
        except AuthenticationError as exc:  # a ConnectionError subclass, but waiting will not help
            raise RuntimeError(
                f"Redis at {redact_url(url) or 'the configured URL'} refused the credentials: {exc}"
            ) from None
        except (*TRANSIENT_ERRORS, asyncio.TimeoutError) as exc:
            last = exc
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
    reason = str(last) if last is not None and str(last) else "no reply"
    raise RuntimeError(f"Redis at {redact_url(url) or 'the configured URL'} did not answer within {timeout:g}s: {reason}")


class Backoff:
    """Exponential back-off with a cap, for loops that must survive Redis restarts."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base, self.cap, self._n = base, cap, 0

    async def sleep(self) -> None:
        await asyncio.sleep(min(self.cap, self.base * (2**self._n)))
        self._n += 1

    def reset(self) -> None:
        self._n = 0
