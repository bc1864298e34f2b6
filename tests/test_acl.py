"""voxbus under the least-privilege Redis user of ops/redis/voxbus.acl (a private redis-server), and clean
errors for bad credentials."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from shared.admin.embedded_redis import EmbeddedRedis
from shared.config import parse_config
from shared.protocol import ChatMessage, Keys, LlmJob, encode, entry
from workers.runtime import Worker

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-acl-test"


def acl_rule() -> list[str]:
    line = next(x for x in (ROOT / "ops/redis/voxbus.acl").read_text().splitlines() if x.startswith("user "))
    return [part.replace(">CHANGE-ME", f">{PASSWORD}") for part in line.split()[2:]]


def user_url(server: EmbeddedRedis, password: str = PASSWORD) -> str:
    return server.url.replace("redis://", f"redis://voxbus:{password}@")


def voxbus(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, REDIS_URL=url)
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


async def test_selfcheck_a_worker_and_a_bridge_session_run_under_the_minimal_acl(embedded_redis: EmbeddedRedis) -> None:
    admin = aioredis.Redis.from_url(embedded_redis.url)
    await admin.execute_command("ACL", "SETUSER", "voxbus", *acl_rule())
    url = user_url(embedded_redis)
    check = await asyncio.to_thread(voxbus, "selfcheck", url=url)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no INFO permission" in check.stdout + check.stderr

    from bridge.core import Bridge

    config = parse_config({"pools": {"llm-acl": {"stage": "llm", "engine": "synthetic", "options": {"step_ms": 1.0}}}},
                          "acl.toml")
    bridge = Bridge(url, config, vad_engine=_NoVad())
    await bridge.start()
    stop = asyncio.Event()
    worker = Worker(url, config.pool("llm-acl"))
    runner = asyncio.create_task(worker.run(stop))
    try:
        ready = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait({ready, runner}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert worker.ready.is_set(), runner.exception() if runner.done() else "worker not ready in 30 s"
        session = await bridge.open_session("acl-call", transport="test")
        await session.context.append(encode(ChatMessage(session="acl-call", role="user", text="Hello?", turn=0)))
        await admin.xadd(Keys.pool_jobs("llm-acl"), entry(LlmJob(session="acl-call", turn=0, max_tokens=4)))
        for _ in range(200):
            if await admin.xlen(Keys.tokens("acl-call")):
                break
            await asyncio.sleep(0.05)
        await bridge.close_session("acl-call")
        assert await admin.xlen(Keys.tokens("acl-call")) > 0
        assert worker.failure is None
        sessions = await asyncio.to_thread(voxbus, "sessions", url=url)
        assert sessions.returncode == 0 and "acl-call" in sessions.stdout, sessions.stdout + sessions.stderr
    finally:
        stop.set()
        await asyncio.wait({runner}, timeout=30)
        await bridge.aclose()
        await admin.aclose()


async def test_a_wrong_password_is_one_clear_line(embedded_redis: EmbeddedRedis) -> None:
    admin = aioredis.Redis.from_url(embedded_redis.url)
    await admin.execute_command("ACL", "SETUSER", "voxbus", *acl_rule())
    await admin.aclose()
    out = await asyncio.to_thread(voxbus, "sessions", url=user_url(embedded_redis, "wrong"))
    assert out.returncode == 2, out
    assert "refused the credentials" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "wrong" not in out.stderr  # the password is never printed


class _NoVad:
    window_samples = 512

    def new_state(self) -> None:
        return None

    def score(self, windows, states):  # type: ignore[no-untyped-def]
        import numpy as np

        return np.zeros(len(windows), np.float32), states
