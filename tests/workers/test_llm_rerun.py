"""An LLM job re-run after its worker died (the stage in workers/stages/llm.py, real Redis): the
first run's chunks are already in the tokens stream and may have been heard, so the re-run never
splices a second, different reply onto them. The engines here are stand-ins for what no test can
run (vLLM, a batching OpenAI server): they differ only in the two attributes the stage reads."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis

from shared.bus import BatchPublisher
from shared.config import PoolConfig
from shared.protocol import ChatMessage, Keys, LlmJob, TokenChunk, decode_entry, encode, output_entry_id, turn_range
from workers.stages.base import StageContext
from workers.stages.llm import LlmStage


class Engine:
    """Replies with `reply`; records the prefix it was asked to continue after."""

    def __init__(self, reply: list[str], **attrs: bool) -> None:
        self.reply = reply
        self.prefixes: list[str] = []
        self.__dict__.update(attrs)

    async def load(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def stream(self, messages: list[ChatMessage], *, request_id: str, max_tokens: int, watch: Any,
                     prefix: str = "") -> AsyncGenerator[str, None]:
        self.prefixes.append(prefix)
        for delta in self.reply:
            yield delta


async def run_again(redis: aioredis.Redis, sid: str, engine: Engine, first_run: list[str], final: bool = False) -> list[TokenChunk]:
    await redis.rpush(Keys.ctx(sid), encode(ChatMessage(session=sid, role="user", text="Tell me about Paris.", turn=0)))
    chunks = [TokenChunk(session=sid, turn=0, seq=i, text=t) for i, t in enumerate(first_run)]
    if final:
        chunks.append(TokenChunk(session=sid, turn=0, seq=len(first_run), text="", final=True))
    for c in chunks:
        await redis.xadd(Keys.tokens(sid), {b"m": encode(c)}, id=output_entry_id(0, c.seq))
    pub = BatchPublisher(redis)
    stage = LlmStage(StageContext(redis, pub, PoolConfig(stage="llm", engine="x", name="llm-test"), "w1"), engine)  # type: ignore[arg-type]
    from shared.cancel import CancelWatch

    await stage.run(LlmJob(session=sid, turn=0), CancelWatch(sid, 0))
    await pub.flush()
    await pub.aclose()
    return [decode_entry(f) for _, f in await redis.xrange(Keys.tokens(sid), *turn_range(0))]  # type: ignore[misc]


async def test_an_engine_that_continues_goes_on_after_what_was_spoken(redis: aioredis.Redis, uid: str) -> None:
    engine = Engine([" is the", " capital of France."], supports_prefix=True)
    got = await run_again(redis, f"rr1-{uid}", engine, ["Paris", " is a city."])
    assert engine.prefixes == ["Paris is a city."]
    assert "".join(c.text for c in got) == "Paris is a city. is the capital of France." and got[-1].final


async def test_an_engine_that_may_decode_differently_ends_the_reply_where_it_was(redis: aioredis.Redis, uid: str) -> None:
    engine = Engine(["Berlin", " is big."])
    got = await run_again(redis, f"rr2-{uid}", engine, ["Paris", " is"])
    assert engine.prefixes == []  # not even asked: its new reply could not be joined to the old one
    assert [c.text for c in got] == ["Paris", " is", ""] and got[-1].final


async def test_a_deterministic_engine_runs_again_and_duplicates_are_refused(redis: aioredis.Redis, uid: str) -> None:
    engine = Engine(["Paris", " is lovely."], deterministic=True)
    got = await run_again(redis, f"rr3-{uid}", engine, ["Paris"])
    assert engine.prefixes == [""]
    assert "".join(c.text for c in got) == "Paris is lovely." and got[-1].final and got[0].text == "Paris"


async def test_a_reply_that_was_complete_is_left_alone(redis: aioredis.Redis, uid: str) -> None:
    engine = Engine(["Other"], supports_prefix=True)
    got = await run_again(redis, f"rr4-{uid}", engine, ["Paris."], final=True)
    assert engine.prefixes == [] and [c.text for c in got] == ["Paris.", ""]
