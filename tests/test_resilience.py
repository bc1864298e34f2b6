"""Surviving Redis going away, and connecting safely (shared/redis_conn.py).

A private redis-server is SIGKILLed and restarted on the same port while a
BatchPublisher + StreamMux flow, a JobQueue consumer and a CancelHub run: frames,
jobs and cancels flow again within seconds, no exception escapes, nothing hangs.
Connections: passwords never reach logs, ACL users work, a wrong password fails
at once with an auth error, `rediss://` builds TLS connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError

from shared.admin.embedded_redis import EmbeddedRedis, free_port
from shared.bus import BatchPublisher, StreamMux
from shared.cancel import CancelHub, publish_cancel
from shared.jobs import JobQueue, enqueue
from shared.protocol import FRAME_BYTES, AsrJob, AudioFrame, Cancel, Keys, frame_entry_id
from shared.redis_conn import TRANSIENT_ERRORS, connect, redact_url, wait_ready

Restart = Callable[..., Awaitable[None]]
T = TypeVar("T")


def assert_running(tasks: Sequence[asyncio.Task]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled():
            raise AssertionError(f"{task.get_name()} ended: {task.exception()!r}")


# Waits below check a deadline themselves instead of relying on cancellation, and
# cleanup never waits on a cancellation: a stuck component fails the test, not hangs it.


async def eventually(
    check: Callable[[], bool], timeout: float, what: str, tasks: Sequence[asyncio.Task] = ()
) -> None:
    """Wait until `check()` holds, failing early if one of `tasks` died."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert_running(tasks)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def within(aw: Awaitable[T], timeout: float, what: str) -> T:
    """`aw`'s result, or AssertionError after `timeout` s (never waits on a cancellation)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise AssertionError(f"{what} did not finish within {timeout}s")
    return task.result()


async def finish(aw: Awaitable[object], timeout: float, what: str, problems: list[str]) -> None:
    """Await `aw` for at most `timeout` s; record a problem instead of hanging or raising."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        problems.append(f"{what} did not finish within {timeout}s")
    elif not task.cancelled() and task.exception() is not None:
        problems.append(f"{what} failed: {task.exception()!r}")


async def cancel_reaches_hub(hub: CancelHub, redis, sid: str, first_turn: int, timeout: float) -> int:
    """Publish cancels for fresh turns until one arrives over pub/sub; returns that turn.

    Each try uses a new watch, so a watch fired by the hub's reconnect resync (reason
    "cancelled during reconnect") cannot pass for one delivered by pub/sub."""
    deadline = asyncio.get_running_loop().time() + timeout
    turn = first_turn
    while asyncio.get_running_loop().time() < deadline:
        watch = await within(hub.watch(sid, turn), 10, "CancelHub.watch")
        assert not watch.cancelled
        try:
            await within(publish_cancel(redis, Cancel(session=sid, turn=turn, reason=f"live-{turn}")), 10, "publish_cancel")
            waiter = asyncio.ensure_future(watch.wait())
            await asyncio.wait([waiter], timeout=0.3)
            waiter.cancel()
            if watch.reason == f"live-{turn}":
                return turn
        finally:
            hub.unwatch(watch)
        turn += 1
    raise AssertionError(f"no cancel reached the hub within {timeout}s")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("down_s", [0.5, 4.5], ids=["brief-outage", "outage-past-client-retries"])
async def test_frames_jobs_and_cancels_flow_again_after_redis_restarts(
    embedded_redis: EmbeddedRedis, restart_redis: Restart, uid: str, down_s: float
) -> None:
    redis = connect(embedded_redis.url)
    sid, pool = f"restart-{uid}", f"restart-{uid}"
    pub = BatchPublisher(redis)
    mux = StreamMux(redis, block_ms=50)
    await mux.add(Keys.audio_in(sid), last_id="0-0")
    hub = CancelHub(redis)
    await within(hub.start(), 10, "CancelHub.start")
    queue = JobQueue(redis, pool, "w1", stage="asr")
    await within(queue.ensure_group(), 10, "JobQueue.ensure_group")

    next_seq = 0
    futures: list[asyncio.Future] = []
    received: set[int] = set()
    jobs_done: list[int] = []
    consumer_errors: list[BaseException] = []

    async def produce() -> None:  # the bridge: one frame every 10 ms, never waiting on Redis
        nonlocal next_seq
        while True:
            frame = AudioFrame(session=sid, seq=next_seq, pcm=bytes(FRAME_BYTES))
            futures.append(pub.publish_nowait(Keys.audio_in(sid), frame, entry_id=frame_entry_id(next_seq)))
            next_seq += 1
            await asyncio.sleep(0.01)

    async def read() -> None:
        while True:
            received.update(r.msg.seq for r in await mux.read())

    async def consume() -> None:
        # A worker loop: JobQueue leaves connection errors that outlast the client's
        # retries to its caller, which backs off and reads again.
        while True:
            try:
                for d in await queue.read(count=4, block_ms=100):
                    jobs_done.append(d.job.turn)
                    await queue.ack(d.entry_id)
            except TRANSIENT_ERRORS as exc:
                consumer_errors.append(exc)
                await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(f(), name=f.__name__) for f in (produce, read, consume)]
    try:
        await eventually(lambda: len(received) >= 10, 10, "frames before the restart", tasks)
        await within(enqueue(redis, pool, AsrJob(session=sid, turn=0, start_seq=0, end_seq=1)), 10, "enqueue")
        await eventually(lambda: 0 in jobs_done, 10, "a job before the restart", tasks)
        await cancel_reaches_hub(hub, redis, sid, 1, 10)

        await within(restart_redis(embedded_redis, down_s=down_s), 30, "restarting Redis")
        restarted_at = next_seq

        await eventually(lambda: any(s >= restarted_at + 10 for s in received), 20, "frames after the restart", tasks)
        await within(enqueue(redis, pool, AsrJob(session=sid, turn=1, start_seq=0, end_seq=1)), 10, "enqueue")
        await eventually(lambda: 1 in jobs_done, 20, "a job after the restart", tasks)
        await cancel_reaches_hub(hub, redis, sid, 100, 20)

        tasks[0].cancel()  # stop producing; everything published since the restart must arrive
        await asyncio.wait([tasks[0]], timeout=5)
        await within(pub.flush(), 20, "BatchPublisher.flush")
        last = next_seq
        await eventually(lambda: set(range(restarted_at, last)) <= received, 20, "every frame published after the restart", tasks)
        assert_running(tasks[1:])
        escaped = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
        assert escaped == [], f"publishes failed instead of being retried: {escaped[:3]}"
        if down_s < 2:  # within the client's own retries: the worker loop never sees an error
            assert consumer_errors == []
    finally:
        problems: list[str] = []
        for task in tasks:
            task.cancel()
        _, stuck = await asyncio.wait(tasks, timeout=5)
        problems += [f"{t.get_name()} ignored cancellation" for t in stuck]
        await finish(pub.aclose(), 10, "BatchPublisher.close", problems)
        await finish(hub.aclose(), 5, "CancelHub.close", problems)
        await finish(redis.aclose(), 5, "Redis.aclose", problems)
    assert problems == []


# ---------------------------------------------------------------- connecting


@pytest.mark.parametrize(
    "url, kept",
    [
        ("redis://alice:s3cr3t-PW@db.example:6379/0", "redis://alice:***@db.example:6379/0"),
        ("redis://:s3cr3t-PW@db.example/0", "redis://:***@db.example/0"),
        ("rediss://bob:s3cr3t-PW%40x%3Ay@cache.example:6380/1?ssl_cert_reqs=none", "cache.example:6380/1?ssl_cert_reqs=none"),
        ("redis://bob:s3cr3t-PW@with@at@db.example/0", "@db.example/0"),
        ("redis://bob:s3cr3t-PW@[::1]:6379/0", "bob:***@[::1]:6379/0"),
        ("redis://db.example:6379/0?password=s3cr3t-PW&db=2", "db=2"),
        ("redis://bob:s3cr3t-PW@db.example:99999/0", "db.example:99999"),
        ("redis://bob:s3cr3t-PW@[::1/0", "bob:***@"),
        ("unix://bob:s3cr3t-PW@/run/redis.sock?db=1", "/run/redis.sock?db=1"),
    ],
)
def test_redact_url_never_shows_the_password(url: str, kept: str) -> None:
    redacted = redact_url(url)
    assert "s3cr3t" not in redacted
    assert kept in redacted


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://alice@h:1/2", "unix:///run/redis.sock", "rediss://h/0"])
def test_redact_url_leaves_urls_without_password_alone(url: str) -> None:
    assert redact_url(url) == url


async def test_acl_user_connects_and_a_wrong_password_fails_at_once(embedded_redis: EmbeddedRedis, uid: str) -> None:
    user, password = f"svc-{uid}", f"pw-{uid}"
    admin = connect(embedded_redis.url)
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~vb:*", "&*", "+@all")
    good = connect(f"redis://{user}:{password}@127.0.0.1:{embedded_redis.port}/0")
    bad_url = f"redis://{user}:wrong-{uid}@127.0.0.1:{embedded_redis.port}/0"
    bad = connect(bad_url)
    try:
        assert await good.acl_whoami() == user
        await good.set(f"vb:acl-{uid}", "1")
        await admin.acl_log_reset()
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(bad.ping(), 30)
        # Refused credentials are not retried like a dropped connection: one attempt only.
        [entry] = [e for e in await admin.acl_log() if e["username"] == user]
        assert entry["reason"] == "auth" and int(entry["count"]) == 1
        with pytest.raises(RuntimeError, match="refused the credentials") as err:
            await asyncio.wait_for(wait_ready(bad, 10, bad_url), 30)
        assert f"wrong-{uid}" not in str(err.value) and f":{embedded_redis.port}" in str(err.value)
    finally:
        for client in (good, bad, admin):
            await client.aclose()


async def test_wait_ready_gives_up_within_its_timeout_naming_the_redacted_url() -> None:
    url = f"redis://alice:s3cr3t-PW@127.0.0.1:{free_port()}/0"  # nothing listens there
    client = connect(url)
    try:
        with pytest.raises(RuntimeError, match=r"did not answer within 0.3s") as err:
            # The outer bound only prevents a hang; wait_ready must give up on its own well before.
            await asyncio.wait_for(wait_ready(client, 0.3, url), 3)
    finally:
        await client.aclose()
    assert "s3cr3t" not in str(err.value) and "alice:***@127.0.0.1" in str(err.value)


@pytest.mark.parametrize(
    "url, connection_class",
    [
        ("rediss://svc:pw@cache.example:6380/0", SSLConnection),
        ("redis://svc:pw@cache.example:6379/0", Connection),
        ("unix:///run/redis.sock", UnixDomainSocketConnection),
    ],
)
async def test_url_scheme_picks_the_connection_class(url: str, connection_class: type) -> None:
    client = connect(url)  # builds the pool only: nothing connects until a command runs
    try:
        assert client.connection_pool.connection_class is connection_class
    finally:
        await client.aclose()


async def test_rediss_url_carries_credentials_and_tls_options() -> None:
    client = connect("rediss://svc:p%40ss@cache.example:6380/3?ssl_cert_reqs=none")
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["host"], kwargs["port"], kwargs["db"]) == (
            "svc", "p@ss", "cache.example", 6380, 3
        )
        assert kwargs["ssl_cert_reqs"] == "none"
    finally:
        await client.aclose()


async def test_embedded_redis_refuses_a_port_served_by_another_process(embedded_redis: EmbeddedRedis) -> None:
    squatter = EmbeddedRedis(port=embedded_redis.port)
    squatter.start()
    try:
        with pytest.raises(RuntimeError, match=f"failed to start on port {embedded_redis.port}"):
            await squatter.ready(timeout=5)
    finally:
        squatter.stop()
    # The original server is untouched.
    client = connect(embedded_redis.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_burst_beyond_redis_py_default_pool_waits_instead_of_failing(redis_url: str, uid: str) -> None:
    """redis-py's own pool refuses a 101st concurrent command; ours queues it (a bridge's burst)."""
    client = connect(redis_url)
    try:
        burst = 300
        results = await asyncio.gather(
            *(client.blpop(f"vb:test:{uid}:burst:{i}", timeout=0.2) for i in range(burst)), return_exceptions=True)
        assert [r for r in results if r is not None] == [], "every BLPOP times out empty; none may fail"
        assert client.connection_pool.max_connections >= burst
    finally:
        await client.aclose()
