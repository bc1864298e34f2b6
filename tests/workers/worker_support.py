"""Helpers for worker tests: seed sessions, enqueue jobs, read what workers wrote."""

from __future__ import annotations

from typing import Any, TypeVar

import redis.asyncio as aioredis

from polling import wait_until
from shared.jobs import enqueue
from shared.protocol import (
    AnyMessage,
    ChatMessage,
    Keys,
    LlmJob,
    TokenChunk,
    TurnMark,
    decode_entry,
    encode,
    turn_range,
)

T = TypeVar("T")


async def start_session(redis: aioredis.Redis, sid: str, user_text: str | None = "hello there") -> None:
    """A context with a system prompt and (unless None) one user message."""
    msgs = [ChatMessage(session=sid, role="system", text="You are terse.")]
    if user_text is not None:
        msgs.append(ChatMessage(session=sid, role="user", text=user_text, turn=0))
    await redis.rpush(Keys.ctx(sid), *(encode(m) for m in msgs))


async def enqueue_llm(redis: aioredis.Redis, pool: str, sid: str, turn: int = 0, max_tokens: int = 256) -> str:
    return await enqueue(redis, pool, LlmJob(session=sid, turn=turn, max_tokens=max_tokens))


async def tokens(redis: aioredis.Redis, sid: str, turn: int = 0) -> list[TokenChunk]:
    lo, hi = turn_range(turn)
    return [decode_entry(fields) for _, fields in await redis.xrange(Keys.tokens(sid), lo, hi)]


async def events(redis: aioredis.Redis, sid: str) -> list[AnyMessage]:
    return [decode_entry(fields) for _, fields in await redis.xrange(Keys.events(sid))]




async def wait_tokens(redis: aioredis.Redis, sid: str, turn: int, n: int, timeout: float = 15.0) -> list[TokenChunk]:
    async def enough() -> list[TokenChunk]:
        toks = await tokens(redis, sid, turn)
        return toks if len(toks) >= n else []

    return await wait_until(enough, timeout, f"{n} tokens of {sid} turn {turn}")


async def wait_final(redis: aioredis.Redis, sid: str, turn: int = 0, timeout: float = 15.0) -> list[TokenChunk]:
    async def final() -> list[TokenChunk]:
        toks = await tokens(redis, sid, turn)
        return toks if toks and toks[-1].final else []

    return await wait_until(final, timeout, f"the final token of {sid} turn {turn}")


def complete_text(toks: list[TokenChunk]) -> str:
    """The reply text, after checking the stream is whole: seq 0..n, each once, final last."""
    seqs = [(t.turn, t.seq) for t in toks]
    assert len(set(seqs)) == len(seqs), f"duplicate (turn, seq) outputs: {seqs}"
    assert [t.seq for t in toks] == list(range(len(toks))), f"gap in token seqs: {[t.seq for t in toks]}"
    assert toks and toks[-1].final and not any(t.final for t in toks[:-1]), "stream does not end in one final token"
    return "".join(t.text for t in toks)


def marks(evts: list[AnyMessage], turn: int, mark: str) -> list[TurnMark]:
    return [e for e in evts if isinstance(e, TurnMark) and e.turn == turn and e.mark == mark]


async def runs_of(redis: aioredis.Redis, sid: str, turn: int = 0) -> int:
    """How many times a job of `turn` started streaming (each run writes one `ttft` mark)."""
    return len(marks(await events(redis, sid), turn, "ttft"))


async def pending_at(redis: aioredis.Redis, pool: str) -> dict[str, int]:
    """Consumer name -> jobs delivered to it and not yet acked."""
    rows = await redis.xinfo_consumers(Keys.pool_jobs(pool), Keys.pool_group(pool))
    return {_s(r["name"]): int(r["pending"]) for r in rows}


async def holder(redis: aioredis.Redis, pool: str, entry_id: str) -> str | None:
    rows = await redis.xpending_range(Keys.pool_jobs(pool), Keys.pool_group(pool), entry_id, entry_id, 1)
    return _s(rows[0]["consumer"]) if rows else None


async def total_pending(redis: aioredis.Redis, pool: str) -> int:
    info = await redis.xpending(Keys.pool_jobs(pool), Keys.pool_group(pool))
    return int(info["pending"])


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
