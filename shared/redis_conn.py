"""Opening Redis connections: URL parsing (TLS, ACL users, Redis Cluster), retries, redaction for logs.

Every process opens its clients through :func:`connect`, so the URL alone decides
between one Redis server and a Redis Cluster:

- ``redis://[user:password@]host:port/0`` (``rediss://`` for TLS, ``unix://`` for a
  socket): one server; :func:`connect` returns a ``redis.asyncio.Redis``.
- the same URL plus the query parameter ``cluster=true``, e.g.
  ``redis://host:port/0?cluster=true`` or
  ``rediss://voxbus:secret@redis-0.redis:6379?cluster=true&ssl_cert_reqs=required``:
  a Redis Cluster; :func:`connect` returns a ``redis.asyncio.cluster.RedisCluster``.
  The host is only the seed: the client asks it for the cluster's layout
  (CLUSTER SLOTS) and then talks to every master directly, so any one node, or
  a DNS name that resolves to any node, will do. TLS, ACL credentials and
  redis-py's other query parameters work as for a single server; the database
  must be 0 and unix sockets are refused (Redis Cluster has neither).
  ``cluster=false`` (or no parameter) means a single server.

Per-session keys carry the hash tag ``{sid}``, so a session lives on one slot;
code that touches keys of several slots at once (MGET, XREAD over many
sessions, pipelines) must split per slot on a cluster: see :func:`is_cluster`,
:func:`mget`, `shared.bus` and `shared.cancel`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("voxbus.redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
# redis-py's pools raise "Too many connections" past 100 by default. A bridge with hundreds of
# sessions can have more commands in flight at a burst (turn ends, cancels): wait for a
# connection instead of failing, up to POOL_WAIT_S.
MAX_CONNECTIONS = 512
POOL_WAIT_S = 10.0
# What a loop that must survive Redis restarts backs off on. The cluster errors are
# what a Redis Cluster answers while a master fails over or a slot moves.
TRANSIENT_ERRORS = (
    RedisConnectionError, RedisTimeoutError, ConnectionError, OSError,
    ClusterDownError, SlotNotCoveredError, TryAgainError,
)


def redis_url_from_env(default: str = DEFAULT_URL) -> str:
    """$REDIS_URL, else `default`."""
    return os.environ.get("REDIS_URL") or default


def env_redis_url() -> str | None:
    """$REDIS_URL, or None when it is not set."""
    return os.environ.get("REDIS_URL") or None


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


def _retry() -> TransientRetry:
    return TransientRetry(ExponentialBackoff(cap=1.0, base=0.02), retries=8)


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """A redis-py asyncio client for `url`: a `RedisCluster` when the URL says `cluster=true`.

    redis://, rediss://, unix://; user:password@ for ACL; see the module
    docstring for Redis Cluster. Commands are retried with exponential
    back-off on connection errors, so a Redis restart (or a cluster failover)
    costs a pause, not a crash.
    """
    url, cluster = split_cluster_flag(url)
    kwargs.setdefault("health_check_interval", 15)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("socket_connect_timeout", 5)
    if cluster:
        return cast(aioredis.Redis, _connect_cluster(url, **kwargs))  # the same commands, routed per slot
    kwargs.setdefault("retry", _retry())
    kwargs.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError, ConnectionResetError])
    kwargs.setdefault("max_connections", MAX_CONNECTIONS)
    kwargs.setdefault("timeout", POOL_WAIT_S)
    client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(url, **kwargs))
    client.auto_close_connection_pool = True  # as Redis.from_url does: aclose() closes the pool too
    return client


_TRUE, _FALSE = frozenset({"true", "yes", "on", "1"}), frozenset({"false", "no", "off", "0"})


def split_cluster_flag(url: str) -> tuple[str, bool]:
    """`url` without its `cluster` query parameter, and whether that parameter asked for a cluster."""
    parts = urlsplit(url)
    if not parts.query:
        return url, False
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    flags = [v.strip().lower() for k, v in pairs if k == "cluster"]
    if not flags:
        return url, False
    for value in flags:
        if value not in _TRUE | _FALSE:
            raise ValueError(f"cluster={value!r} in the Redis URL: expected true or false")
    rest = urlencode([(k, v) for k, v in pairs if k != "cluster"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), flags[-1] in _TRUE


class ClusterClient(RedisCluster):
    """A RedisCluster that backs off between attempts like the single-node client.

    redis-py 8.1's cluster client re-reads the cluster layout and retries a
    failed command at once (it sleeps only on CLUSTERDOWN), so a node restart
    would burn its retries in milliseconds. Commands here go through
    `TransientRetry`; pipelines keep redis-py's own retries (0.25 s apart).
    A seed that cannot be reached surfaces as a ConnectionError (redis-py
    raises a bare RedisClusterException), and refused credentials as the
    AuthenticationError they are, so callers handle both as for one server.
    XREAD and XREADGROUP are routed by their STREAMS keys here: redis-py asks
    the server (COMMAND GETKEYS, one more round trip) for every such call.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backoff_retry = _retry()
        self._backoff_retry.update_supported_errors([ClusterDownError, SlotNotCoveredError, TryAgainError])

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async def once() -> Any:
            return await RedisCluster.execute_command(self, *args, **kwargs)

        return await self._backoff_retry.call_with_retry(once, _ignore)  # type: ignore[no-untyped-call]

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if isinstance(command, str) and command.upper() in _STREAM_READS:
            keys = _stream_read_keys(args)
            if keys:
                slots = {key_slot(self.encoder.encode(k)) for k in keys}  # type: ignore[no-untyped-call]
                if len(slots) != 1:
                    raise RedisClusterException(f"{command} - all keys must map to the same key slot")
                return slots.pop()
        return await super()._determine_slot(command, *args)

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            cause = exc.__cause__
            if isinstance(cause, AuthenticationError):
                raise cause from None
            if isinstance(cause, (RedisConnectionError, RedisTimeoutError, OSError)):
                raise RedisConnectionError(str(exc)) from cause
            raise


async def _ignore(_error: BaseException) -> None:
    return None


_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})


def _stream_read_keys(args: tuple[Any, ...]) -> list[Any]:
    """The keys of `XREAD[GROUP] ... STREAMS k1 .. kn id1 .. idn` (empty when malformed)."""
    for i, arg in enumerate(args):
        if isinstance(arg, (str, bytes)) and arg.upper() in ("STREAMS", b"STREAMS"):
            rest = args[i + 1 :]
            return list(rest[: len(rest) // 2]) if rest and len(rest) % 2 == 0 else []
    return []


def _connect_cluster(url: str, **kwargs: Any) -> ClusterClient:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"a Redis Cluster URL must be redis:// or rediss://, not {parts.scheme}://")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, the URL names {parts.path.strip('/')!r}")
    # Only the number of attempts is read from it: the back-off is ClusterClient's.
    kwargs.setdefault("retry", TransientRetry(ExponentialBackoff(cap=1.0, base=0.02), retries=3))
    return cast(ClusterClient, ClusterClient.from_url(url, **kwargs))


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


# What a cluster client's node connections carry that a single-node client takes as is.
_NODE_SETTINGS = (
    "username", "password", "credential_provider", "client_name", "driver_info", "encoding", "encoding_errors",
    "decode_responses", "protocol", "socket_timeout", "socket_connect_timeout", "socket_keepalive",
    "socket_keepalive_options", "socket_read_size", "health_check_interval", "ssl_keyfile", "ssl_certfile",
    "ssl_cert_reqs", "ssl_include_verify_flags", "ssl_exclude_verify_flags", "ssl_ca_certs", "ssl_ca_data",
    "ssl_check_hostname", "ssl_min_version", "ssl_ciphers",
)


def node_client(node: ClusterNode, **kwargs: Any) -> aioredis.Redis:
    """A plain single-node client of one cluster node, with the cluster client's credentials and TLS.

    Its connections are its own: the cluster client drops all of its node
    connections whenever it re-reads the cluster's layout, which would cut a
    long-lived subscription each time.
    """
    settings = {k: v for k, v in node.connection_kwargs.items() if k in _NODE_SETTINGS}
    settings["ssl"] = issubclass(node.connection_class, SSLConnection)
    settings.update(kwargs)
    return aioredis.Redis(host=node.host, port=int(node.port), **settings)


async def mget(redis: Any, keys: Sequence[str]) -> list[bytes | None]:
    """MGET of keys in any slots: one MGET per slot on a cluster (not atomic across slots)."""
    if not keys:
        return []
    if is_cluster(redis):
        return cast(list[bytes | None], await redis.mget_nonatomic(list(keys)))
    return cast(list[bytes | None], await redis.mget(list(keys)))


# A stream entry as redis-py returns it on a bytes client (decode_responses is never set).
StreamEntry = tuple[bytes, dict[bytes, bytes]]


async def xrange(redis: Any, key: str, start: str = "-", end: str = "+", count: int | None = None) -> list[StreamEntry]:
    """XRANGE with the types voxbus's clients actually return."""
    return cast(list[StreamEntry], await redis.xrange(key, start, end, count=count))


async def xrevrange(redis: Any, key: str, end: str = "+", start: str = "-", count: int | None = None) -> list[StreamEntry]:
    """XREVRANGE with the types voxbus's clients actually return."""
    return cast(list[StreamEntry], await redis.xrevrange(key, end, start, count=count))


async def xread(redis: Any, positions: dict[str, bytes | str], count: int | None = None,
                block_ms: int | None = None) -> list[tuple[bytes, list[StreamEntry]]]:
    """XREAD with the types voxbus's clients actually return ([] when nothing came)."""
    reply = await redis.xread(positions, count=count, block=block_ms)
    return cast(list[tuple[bytes, list[StreamEntry]]], reply or [])


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
        except (TimeoutError, *TRANSIENT_ERRORS) as exc:
            last = exc
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
    reason = str(last) if last is not None and str(last) else "no reply"
    raise RuntimeError(f"Redis at {redact_url(url) or 'the configured URL'} did not answer within {timeout:g}s: {reason}")


class Backoff:
    """Exponential back-off with jitter and a cap, for loops that must survive Redis restarts.

    redis-py's EqualJitterBackoff computes the delay (half fixed, half random), so a fleet of
    workers that lost Redis together does not reconnect in lock-step; this only counts failures
    and sleeps.
    """

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self._strategy = EqualJitterBackoff(cap=cap, base=base)
        self._n = 0

    @property
    def failures(self) -> int:
        return self._n

    def next_delay(self) -> float:
        self._n += 1
        return float(self._strategy.compute(self._n - 1))

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self._n = 0
