"""A 100-turn call against the real llama.cpp worker: time to first token stays flat.

Before: the context list was never capped, and llama.cpp's own trimming (past
n_ctx) dropped one message per turn, changing the prompt prefix every turn:
TTFT went from ~50 ms to ~11.5 s per turn after ~30 real turns. Now the
bridge bounds the context and trims it in chunks (bridge/context.py), so the
prefix, and llama.cpp's KV cache of it, stays put between trims.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import pytest
import redis.asyncio as aioredis

from bridge.context import SessionContext
from shared.protocol import ChatMessage, Keys, LlmJob, TokenChunk, TurnMark, decode_entry, encode, entry, turn_range
from tests.support.chaos import ChaosCluster

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="session")]

TURNS = 100


async def wait_reply(redis: aioredis.Redis, sid: str, turn: int, timeout_s: float = 60.0) -> tuple[str, float]:
    """The reply text of `turn` and its TTFT mark (ms), once the final token is in."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chunks = [decode_entry(f) for _, f in await redis.xrange(Keys.tokens(sid), *turn_range(turn))]
        if any(isinstance(c, TokenChunk) and c.final for c in chunks):
            marks = [decode_entry(f) for _, f in await redis.xrevrange(Keys.events(sid), count=50)]
            ttft = next(m.value_ms for m in marks if isinstance(m, TurnMark) and m.turn == turn and m.mark == "ttft")
            return "".join(c.text for c in chunks if isinstance(c, TokenChunk)), ttft
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no reply to turn {turn}")


async def test_ttft_stays_flat_over_a_100_turn_call(chaos_cluster: ChaosCluster) -> None:
    cluster = chaos_cluster
    config = cluster.config().bridge
    redis = aioredis.Redis.from_url(cluster.redis_url)
    sid = f"long-{uuid.uuid4().hex[:8]}"
    system = encode(ChatMessage(session=sid, role="system", text=config.system_prompt))
    ctx = SessionContext(redis, sid, meta=b"", system=system, ttl_s=600, max_messages=config.context_max_messages,
                         max_chars=config.context_max_chars)
    pipe = redis.pipeline(transaction=False)
    ctx.open_into(pipe)
    await pipe.execute()
    ttft: list[float] = []
    try:
        for turn in range(TURNS):
            await ctx.append(encode(ChatMessage(session=sid, role="user", turn=turn,
                                                text=f"Thanks. Now tell me one fact about the number {turn}, please.")))
            await redis.xadd(Keys.pool_jobs(cluster.pools["llm"]), entry(LlmJob(session=sid, turn=turn, max_tokens=16)))
            text, ms = await wait_reply(redis, sid, turn)
            ttft.append(ms)
            await ctx.append(encode(ChatMessage(session=sid, role="assistant", text=text.strip() or "OK.", turn=turn)))
        early, late = statistics.median(ttft[5:15]), statistics.median(ttft[90:100])
        print(f"\nTTFT turn 5: {ttft[5]:.0f} ms, turn 100: {ttft[99]:.0f} ms; median turns 5-14 {early:.0f} ms, "
              f"90-99 {late:.0f} ms; max {max(ttft):.0f} ms; context trims {ctx.trims}; "
              f"{len(ctx.entries)} entries now")
        assert ctx.trims >= 3
        assert late <= 2 * early + 150, (early, late, ttft)
        assert sorted(ttft)[-5] < 10 * early + 1000, ttft  # even trim turns stay far from a full re-read each turn
    finally:
        await redis.delete(*Keys.session_streams(sid), Keys.ctx(sid))
        await redis.aclose()
