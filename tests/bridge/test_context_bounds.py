"""The conversation context stays bounded, in memory and in Redis, trimmed in chunks (real Redis)."""

from __future__ import annotations

import redis.asyncio as aioredis

from bridge.context import SessionContext
from shared.protocol import ChatMessage, Keys, decode_as, encode


def msg(sid: str, role: str, text: str, turn: int) -> bytes:
    return encode(ChatMessage(session=sid, role=role, text=text, turn=turn))  # type: ignore[arg-type]


async def test_a_long_call_keeps_a_bounded_context_with_a_stable_prefix(redis: aioredis.Redis, uid: str) -> None:
    sid = f"long-{uid}"
    ctx = SessionContext(redis, sid, meta=b"meta", system=msg(sid, "system", "Be brief.", -1), ttl_s=60,
                         max_messages=10, max_chars=100_000)
    pipe = redis.pipeline(transaction=False)
    ctx.open_into(pipe)
    await pipe.execute()
    prefixes: list[bytes] = []
    for turn in range(100):
        await ctx.append(msg(sid, "user", f"question {turn}", turn))
        await ctx.append(msg(sid, "assistant", f"answer {turn}", turn))
        stored = await redis.lrange(Keys.ctx(sid), 0, -1)
        assert stored == ctx.entries  # Redis mirrors memory
        assert len(stored) - 1 <= 10
        prefixes.append(stored[1])  # the first message after the system prompt
    changes = sum(1 for a, b in zip(prefixes, prefixes[1:]) if a != b)
    assert ctx.trims == changes and changes <= 100 * 2 / 5 + 1, changes  # one trim per ~5 turns, not one per turn
    first = decode_as(ctx.entries[1], ChatMessage)
    assert first.role == "user" and decode_as(ctx.entries[0], ChatMessage).role == "system"
    assert decode_as(ctx.entries[-1], ChatMessage).text == "answer 99"


async def test_long_messages_are_bounded_by_size_too(redis: aioredis.Redis, uid: str) -> None:
    sid = f"chars-{uid}"
    ctx = SessionContext(redis, sid, meta=b"meta", system=msg(sid, "system", "Be brief.", -1), ttl_s=60,
                         max_messages=1000, max_chars=1000)
    pipe = redis.pipeline(transaction=False)
    ctx.open_into(pipe)
    await pipe.execute()
    for turn in range(30):
        await ctx.append(msg(sid, "user", "x" * 150, turn))
    texts = [decode_as(e, ChatMessage).text for e in await redis.lrange(Keys.ctx(sid), 1, -1)]
    assert sum(map(len, texts)) <= 1000 and len(texts) >= 3
