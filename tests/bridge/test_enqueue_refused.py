"""A job Redis refuses to queue fails its turn visibly; the call goes on.

The refusal is real: the ASR pool's job stream key holds a string, so Redis
answers the XADD with WRONGTYPE, as it would answer with OOM when it is out of
memory. The caller must be told (a control `error`), the recording must show
it (a JobFailed event), the turn must go back to listening, the refusal must
be counted, and the bridge must keep serving (its ingest tick survives).
No worker is needed: nothing ever reaches a pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from bridge.core import Bridge
from shared.protocol import JobFailed, Keys, decode_entry
from tests.engines.speech import pad_silence, synthesize_16k
from tests.support.bridge import pools_config


class Sink:
    def __init__(self) -> None:
        self.control: list[dict[str, Any]] = []

    def send_tokens(self, turn: int, seq: int, text: str, final: bool) -> None:
        return None

    def send_control(self, msg: dict[str, Any]) -> None:
        self.control.append(msg)


async def test_refused_job_fails_the_turn_and_the_call_goes_on(redis_url: str, counter) -> None:  # type: ignore[no-untyped-def]
    config = pools_config(eot="none", preemptive_pause_ms=0)  # the turn ends on silence alone
    asr_pool = config.default_pool("asr").name
    redis = aioredis.Redis.from_url(redis_url)
    await redis.set(Keys.pool_jobs(asr_pool), "not a stream")
    before = counter("voxbus_jobs_enqueue_failed_total", stage="asr", pool=asr_pool)
    bridge = Bridge(redis_url, config)
    await bridge.start()
    sink = Sink()
    try:
        session = await bridge.open_session(sink=sink, transport="test")
        pcm = pad_silence(synthesize_16k("What is the capital of France?"), 0.3, 1.2)
        for start in range(0, len(pcm), 1600):  # 100 ms at a time, in real time
            session.push_audio(pcm[start:start + 1600])
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 10
        while not [m for m in sink.control if m.get("type") == "error"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        errors = [m for m in sink.control if m.get("type") == "error"]
        assert errors and errors[0]["stage"] == "asr" and "could not queue the job" in errors[0]["reason"], sink.control
        assert "WRONGTYPE" in errors[0]["reason"]
        assert session.state.value == "listening"
        assert counter("voxbus_jobs_enqueue_failed_total", stage="asr", pool=asr_pool) == before + 1
        events = [decode_entry(fields) for _, fields in await redis.xrange(Keys.events(session.id))]
        assert [e.stage for e in events if isinstance(e, JobFailed)] == ["asr"]

        # the bridge still ingests: new frames keep landing in the session's recording
        frames = await redis.xlen(Keys.audio_in(session.id))
        session.push_audio(pcm[:3200])
        await asyncio.sleep(0.3)
        assert await redis.xlen(Keys.audio_in(session.id)) > frames
    finally:
        await bridge.aclose()
        await redis.delete(Keys.pool_jobs(asr_pool))
        await redis.aclose()
