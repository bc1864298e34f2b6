"""Fixtures shared by the whole test suite.

- `redis_url`: the Redis under test ($REDIS_URL, else the local default); fails
  the run with a clear message when nothing answers there.
- `uid`: a short unique id; put it in every key, session id and pool name a test
  creates, because the default Redis is shared with other test runs.
- `redis`: an asyncio client made by `shared.redis_conn.connect`; on teardown it
  deletes every key whose name contains the test's `uid`, then closes.
- `embedded_redis`: a private redis-server (function scope) for tests that kill
  or reconfigure their server; `restart_redis` crashes and restarts it.
- `counter`: the current value of a Prometheus counter summed over label sets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
import redis as sync_redis
import redis.asyncio as aioredis

from shared.admin.embedded_redis import EmbeddedRedis
from shared.redis_conn import DEFAULT_URL, connect, redact_url
from tests.support.prom import local_counter


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL") or DEFAULT_URL
    client = sync_redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except sync_redis.RedisError as exc:
        pytest.fail(
            f"no Redis answers at {redact_url(url)} ({type(exc).__name__}: {exc}). Start one with "
            "`redis-server --daemonize yes --port 6379 --save '' --appendonly no` or set REDIS_URL.",
            pytrace=False,
        )
    finally:
        client.close()
    return url


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest_asyncio.fixture
async def redis(redis_url: str, uid: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    try:
        yield client
    finally:
        try:
            stale = [k async for k in client.scan_iter(match=f"*{uid}*", count=1000)]
            for i in range(0, len(stale), 500):
                await client.delete(*stale[i : i + 500])
        finally:
            await client.aclose()


@pytest_asyncio.fixture
async def embedded_redis() -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    try:
        await server.ready()
        yield server
    finally:
        server.stop()


async def _crash_and_restart(server: EmbeddedRedis, down_s: float = 0.5) -> None:
    """SIGKILL the server (no clean shutdown), stay down `down_s`, start it on the same port."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(server.proc.wait)
    server.stop()  # releases the old data directory; the process is already gone
    await asyncio.sleep(down_s)
    server.start()
    await server.ready()


@pytest.fixture
def restart_redis() -> Callable[..., Awaitable[None]]:
    return _crash_and_restart




@pytest.fixture
def counter() -> Callable[..., float]:
    return local_counter
