"""Overload is visible and bounded: what an overloaded caller hears and sees, and new calls refused.

Real worker processes (tests/bridge's shared WorkerSet) and a real WebRTC caller; the overload is made by
giving the ASR jobs a deadline no worker can meet, so the live ASR worker drops each one as too late.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from shared.protocol import AsrJob, Keys, entry
from tests.engines.speech import pad_silence, synthesize_16k
from tests.support.bridge import TOKEN, RtcClient, WorkerSet, pools_config, running_bridge


async def test_an_overloaded_caller_hears_an_apology_not_silence(redis_url: str, workers: WorkerSet) -> None:
    config = workers.config()
    config.bridge.job_deadline_s = {**config.bridge.job_deadline_s, "asr": 0.0001}
    async with running_bridge(redis_url, config) as (bridge, transport):
        client = RtcClient(transport.url)
        try:
            await client.connect()
            await client.wait_open()
            client.mic.play(pad_silence(synthesize_16k("What is the capital of France?"), 0.5, 0.5),
                            mark_voiced_end="end")
            await client.wait_for(lambda: "end" in client.mic.marks, 30, "the question")
            busy = await client.wait_for(lambda: client.controls("busy"), 30, "a busy message")
            busy_after = next(t for t, m in client.control if m.get("type") == "busy") - client.mic.marks["end"]
            first = await client.wait_for(lambda: client.audio_frames(client.mic.marks["end"]), 60,
                                          "the spoken apology")
            heard_after = first[0][0] - client.mic.marks["end"]
            print(f"\noverloaded caller: busy message {busy_after * 1000:.0f} ms, apology audio "
                  f"{heard_after * 1000:.0f} ms after the end of speech ({busy[0]['reason']})")
            assert busy[0]["stage"] == "asr" and "overloaded" in busy[0]["reason"]
            assert busy_after < 5.0 and heard_after < 10.0
        finally:
            await client.aclose()


async def test_new_calls_are_refused_while_a_default_pool_is_far_behind(redis_url: str, uid: str) -> None:
    config = pools_config(admission_max_wait_ms=1000.0)
    pool = config.default_pool("asr").name
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await redis.xgroup_create(Keys.pool_jobs(pool), Keys.pool_group(pool), id="0", mkstream=True)
        old = int(time.time() * 1000) - 5000  # a job queued 5 s ago that nobody took
        await redis.xadd(Keys.pool_jobs(pool), entry(AsrJob(session=f"s-{uid}", turn=0, start_seq=0, end_seq=1)),
                         id=f"{old}-0")
        async with running_bridge(redis_url, config) as (_, transport):
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{transport.url}v1/offer", headers={"Authorization": f"Bearer {TOKEN}"},
                                     json={"sdp": "v=0", "type": "offer"}) as resp:
                    body: dict[str, Any] = await resp.json()
                    assert resp.status == 503 and body["error"] == "overloaded", body
                    assert int(resp.headers["Retry-After"]) >= 1 and pool in body["message"]
    finally:
        await redis.delete(Keys.pool_jobs(pool))
        await redis.aclose()
