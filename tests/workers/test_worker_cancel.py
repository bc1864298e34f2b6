"""Barge-in cancellation against real worker processes (synthetic and llama.cpp engines).

A token's `ts` is stamped by the worker when the token is produced, on the
same wall clock this process reads, so "tokens produced after the cancel was
published" is a direct count.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time

import pytest

from shared.cancel import publish_cancel
from shared.models import ModelMissing, resolve
from shared.protocol import Cancel, Cancelled
from tests.support.polling import wait_until
from tests.support.workers import (
    complete_text,
    enqueue_llm,
    events,
    runs_of,
    start_session,
    tokens,
    wait_final,
    wait_tokens,
)

pytestmark = pytest.mark.timeout(120)

LLAMA_MODEL = "bundled:smollm2-135m-instruct"


async def cancelled_events(redis, sid: str) -> list[Cancelled]:
    return [e for e in await events(redis, sid) if isinstance(e, Cancelled)]


async def test_cancel_stops_running_job_skips_queued_job_and_spares_other_session(redis, cluster, uid):
    step_s = 0.05
    pool = cluster.pool("cancel", slots=2, options={"step_ms": step_s * 1000, "tokens": 40})
    await cluster.start(pool)
    a, b = f"a-{uid}", f"b-{uid}"
    await asyncio.gather(start_session(redis, a), start_session(redis, b))
    await enqueue_llm(redis, pool, a, turn=0)
    await enqueue_llm(redis, pool, b, turn=0)
    await asyncio.gather(wait_tokens(redis, a, 0, 1), wait_tokens(redis, b, 0, 1))
    await enqueue_llm(redis, pool, a, turn=1)  # both slots busy: this one waits in the queue
    await wait_tokens(redis, a, 0, 3)

    published = time.time()
    await publish_cancel(redis, Cancel(session=a, turn=1))

    async def both_cancelled() -> list[Cancelled]:
        found = await cancelled_events(redis, a)
        return found if len(found) == 2 else []

    running, queued = sorted(await wait_until(both_cancelled, 10, "two Cancelled events of session A"), key=lambda c: c.turn)
    assert (running.turn, running.stage, running.reason) == (0, "llm", "barge-in")
    assert queued.turn == 1 and queued.reason.startswith("skipped"), queued
    a0 = await tokens(redis, a, 0)
    late = [t for t in a0 if t.ts > published]
    assert len(late) <= 1, f"{len(late)} tokens produced after the cancel (at most the step in flight)"
    assert running.ts - published < 1.0  # stopped well before the 2 s reply would have ended
    assert not any(t.final for t in a0) and len(a0) < 40
    assert await tokens(redis, a, 1) == []
    assert await runs_of(redis, a, 1) == 0

    b0 = await wait_final(redis, b, 0)
    assert len(complete_text(b0).split()) == 40
    await asyncio.sleep(4 * step_s)
    assert len(await tokens(redis, a, 0)) == len(a0), "tokens kept coming after the Cancelled event"


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
async def test_llamacpp_worker_stops_within_one_token(redis, cluster, uid):
    try:
        resolve(LLAMA_MODEL)
    except ModelMissing as exc:
        pytest.skip(f"bundled model missing: {exc}")
    pool = cluster.pool("llama", engine="llamacpp", options={"model": LLAMA_MODEL, "n_ctx": 1024, "temperature": 0.0})
    await cluster.start(pool, ready_timeout=90)
    sid = f"llama-{uid}"
    await start_session(redis, sid, "Tell me a long story about a dragon who learns to fly.")
    await enqueue_llm(redis, pool, sid, max_tokens=200)
    await wait_tokens(redis, sid, 0, 4, timeout=30)

    published = time.time()
    await publish_cancel(redis, Cancel(session=sid, turn=0))
    cancelled = (await wait_until(lambda: cancelled_events(redis, sid), 10, "the Cancelled event"))[0]
    assert cancelled.turn == 0 and cancelled.reason == "barge-in"

    toks = await tokens(redis, sid, 0)
    late = [t for t in toks if t.ts > published]
    assert len(late) <= 1, f"{len(late)} tokens produced after the cancel"
    assert not any(t.final for t in toks) and len(toks) < 200
    await asyncio.sleep(0.3)
    assert len(await tokens(redis, sid, 0)) == len(toks)
