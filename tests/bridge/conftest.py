"""Fixtures of the bridge tests (their helpers are in tests/support/bridge.py)."""

from __future__ import annotations

import pytest

from tests.support.bridge import WorkerSet, shared_workers


@pytest.fixture(scope="session")
def workers(request: pytest.FixtureRequest, redis_url: str) -> WorkerSet:
    return shared_workers(request, redis_url)
