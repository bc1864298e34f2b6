"""The fixtures of the LiveKit transport tests (a pytest plugin: `pytest_plugins` in those modules).

- `bridge`: a real Bridge (shared Redis, real Silero VAD) with 4 sessions at most.
- `job`: a job thread (`JobThread`); `publisher`: writes what workers would.
- `rig`: a call in a room double (`start_rig`); on teardown, nothing over LiveKit's 15 KiB limit was sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from bridge.core import Bridge
from bridge.vad import create as create_vad
from shared.bus import BatchPublisher
from shared.protocol import Keys
from tests.support.livekit_rig import CallRig, JobThread, make_config, start_rig


@pytest.fixture(scope="module")
def vad_engine() -> Any:
    return create_vad("silero", {"threads": 1})


@pytest_asyncio.fixture
async def bridge(redis_url: str, uid: str, redis: aioredis.Redis, vad_engine: Any) -> AsyncIterator[Bridge]:
    b = Bridge(redis_url, make_config(uid), vad_engine=vad_engine)
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()
        members = [m async for m, _ in redis.zscan_iter(Keys.SESSIONS, match=f"*{uid}*")]
        if members:
            await redis.zrem(Keys.SESSIONS, *members)


@pytest.fixture
def job() -> Iterator[JobThread]:
    thread = JobThread()
    yield thread
    thread.close()


@pytest_asyncio.fixture
async def publisher(redis: aioredis.Redis) -> AsyncIterator[BatchPublisher]:
    pub = BatchPublisher(redis)
    yield pub
    await pub.aclose()


@pytest_asyncio.fixture
async def rig(bridge: Bridge, job: JobThread, uid: str) -> AsyncIterator[CallRig]:
    r = await start_rig(bridge, job, uid)
    yield r
    await job.run(r.call.aclose("test over"))
    await job.run(r.mic.aclose())
    assert r.room.local_participant.oversize == [], "a packet over LiveKit's 15 KiB limit was sent"


