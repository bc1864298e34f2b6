"""Fixtures of the worker tests: a pools file per test and real `voxbus worker` processes
(tests/support/workers.py: `Cluster`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import redis.asyncio as aioredis

from tests.support.workers import Cluster


@pytest_asyncio.fixture
async def cluster(redis: aioredis.Redis, redis_url: str, tmp_path: Path, uid: str) -> AsyncIterator[Cluster]:
    c = Cluster(redis, redis_url, tmp_path, uid)
    try:
        yield c
    finally:
        await c.aclose()
