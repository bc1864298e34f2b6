"""Fixtures of the chaos suite (its helpers are in tests/support/chaos.py)."""

from __future__ import annotations

import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.admin.embedded_redis import EmbeddedRedis
from shared.config import parse_config
from tests.support.chaos import ChaosCluster, wait_redis_sync
from tests.support.pools import renamed_cpu_pools_toml


@pytest.fixture(scope="session")
def chaos_cluster() -> Iterator[ChaosCluster]:
    """Private Redis + one worker per stage (tests top pools up with `ensure`)."""
    server = EmbeddedRedis()
    server.start()
    wait_redis_sync(server)
    workdir = Path(tempfile.mkdtemp(prefix="voxbus-chaos-"))
    pools_file = workdir / "pools.toml"
    pools_file.write_text(renamed_cpu_pools_toml("c" + uuid.uuid4().hex[:6]))
    cfg = parse_config(tomllib.loads(pools_file.read_text()), str(pools_file))
    cluster = ChaosCluster(server, workdir, pools_file, {stage: cfg.default_pool(stage).name for stage in cfg.stages})
    try:
        cluster.ensure_all(1)
        yield cluster
    finally:
        cluster.stop()
