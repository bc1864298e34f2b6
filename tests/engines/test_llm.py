"""llama.cpp engine with the bundled SmolLM2-135M-Instruct: streaming, cancel, close, determinism, warm prefix."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import workers.llm
from shared.cancel import CancelWatch
from shared.protocol import ChatMessage
from workers.llm.llamacpp import LlamaCppLlm

SYSTEM = (
    "You are Vox, a friendly voice assistant for a busy household. You answer spoken questions. "
    "Keep every answer short, one or two sentences, because it will be read aloud. Never use lists, "
    "tables, markdown, emojis or code. If you do not know something, say so plainly and suggest where "
    "the caller could find out. Be warm, calm and polite, and do not repeat the question back."
)
QUESTION = "Tell me about the moon and why it has phases."
MAX_TOKENS = 48
LONG = 300  # the reply to QUESTION runs on past this: a stream that stops early ends well short of it


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(session="t", role="user", text=text)]


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppLlm]:
    llm = LlamaCppLlm(system_prompt=SYSTEM)
    asyncio.run(llm.load())
    yield llm
    asyncio.run(llm.aclose())


async def collect(llm: LlamaCppLlm, text: str = QUESTION, max_tokens: int = MAX_TOKENS) -> list[str]:
    return [d async for d in llm.stream(user(text), request_id="r", max_tokens=max_tokens, watch=None)]


@pytest.fixture(scope="module")
def reference(engine: LlamaCppLlm) -> str:
    return "".join(asyncio.run(collect(engine)))


def assert_idle(llm: LlamaCppLlm) -> None:
    """Every Llama instance is back in the pool: no decode thread holds one."""
    assert llm.free_instances == llm.instances


async def test_streams_many_deltas_not_one_blob(engine: LlamaCppLlm, reference: str) -> None:
    deltas = await collect(engine)
    assert len(deltas) >= 10
    assert max(len(d) for d in deltas) < len(reference) / 4
    assert "".join(deltas) == reference
    assert engine.last_stats is not None and engine.last_stats.stopped == ""


async def test_same_prompt_gives_same_tokens(engine: LlamaCppLlm, reference: str) -> None:
    await collect(engine, "What is the capital of France?")  # something else in the KV cache in between
    assert "".join(await collect(engine)) == reference


@pytest.mark.parametrize("k", [1, 3])
async def test_cancel_stops_within_one_token(engine: LlamaCppLlm, reference: str, k: int) -> None:
    watch = CancelWatch("t", 1)
    received: list[str] = []
    async for delta in engine.stream(user(QUESTION), request_id="r", max_tokens=LONG, watch=watch):
        received.append(delta)
        if len(received) == k:
            watch.fire("barge-in")
            stats = engine.last_stats
            assert stats is not None
            decoded_at_fire = stats.tokens
    assert k <= len(received) <= k + 1
    assert stats.stopped == "cancelled"
    assert stats.tokens <= decoded_at_fire + 1  # the decode thread saw the flag before the next token
    assert_idle(engine)
    assert "".join(await collect(engine)) == reference  # usable at once, and the cache is still consistent


async def test_cancel_before_start_decodes_nothing(engine: LlamaCppLlm) -> None:
    watch = CancelWatch("t", 1)
    watch.fire("cancelled before start")
    assert [d async for d in engine.stream(user(QUESTION), request_id="r", max_tokens=MAX_TOKENS, watch=watch)] == []
    assert engine.last_stats is not None and engine.last_stats.tokens == 0
    assert_idle(engine)


async def test_closing_the_iterator_stops_generation(engine: LlamaCppLlm, reference: str) -> None:
    stream = engine.stream(user(QUESTION), request_id="r", max_tokens=LONG, watch=None)
    got = [await anext(stream) for _ in range(3)]
    await stream.aclose()
    stats = engine.last_stats
    assert stats is not None and stats.stopped == "closed"
    assert stats.tokens < LONG / 2
    assert_idle(engine)
    assert reference.startswith("".join(got))


async def test_cancelling_the_consuming_task_stops_generation(engine: LlamaCppLlm) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(user(QUESTION), request_id="r", max_tokens=LONG, watch=None):
            first.set()

    task = asyncio.ensure_future(consume())
    await first.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.last_stats is not None and engine.last_stats.stopped == "closed"
    assert engine.last_stats.tokens < LONG / 2
    assert_idle(engine)


async def test_concurrent_streams_share_one_instance_safely(engine: LlamaCppLlm, reference: str) -> None:
    a, b = await asyncio.gather(collect(engine), collect(engine))
    assert "".join(a) == "".join(b) == reference


async def test_system_prompt_prefix_stays_in_the_kv_cache(engine: LlamaCppLlm) -> None:
    system_tokens = engine.count_tokens(SYSTEM)
    await collect(engine, "Hello there.", max_tokens=4)
    await collect(engine, "What should I cook for dinner tonight with rice, eggs and some spinach?", max_tokens=4)
    stats = engine.last_stats
    assert stats is not None
    # Only the new user turn (and the system prompt's last partial batch) was evaluated.
    assert 0 < stats.prompt_tokens_evaluated < system_tokens


async def test_warm_leaves_the_bridges_system_prompt_in_the_cache() -> None:
    """A pool whose engine has no system prompt of its own gets it from the bridge in every job:
    `warm()` (the pool's `warm_prompt`) prefills it at load, so the first turn does not."""
    first_turn = [ChatMessage(session="t", role="system", text=SYSTEM), *user("Hello there.")]
    cold, warm = LlamaCppLlm(n_ctx=512), LlamaCppLlm(n_ctx=512)
    await cold.load()
    await warm.load()
    await warm.warm(SYSTEM)
    try:
        evaluated = []
        for llm in (cold, warm):
            deltas = [d async for d in llm.stream(first_turn, request_id="r", max_tokens=4, watch=None)]
            assert deltas and llm.last_stats is not None
            evaluated.append(llm.last_stats.prompt_tokens_evaluated)
        assert evaluated[1] < cold.count_tokens(SYSTEM) < evaluated[0]
    finally:
        await cold.aclose()
        await warm.aclose()


async def test_replies_do_not_depend_on_what_the_cache_held(engine: LlamaCppLlm, reference: str) -> None:
    cold = LlamaCppLlm(system_prompt=SYSTEM, warmup=False)
    await cold.load()
    try:
        assert "".join(await collect(cold)) == reference  # as a re-run job on a fresh worker
    finally:
        await cold.aclose()


async def test_a_context_longer_than_the_window_drops_the_oldest_turns() -> None:
    small = LlamaCppLlm(n_ctx=256, warmup=False)
    await small.load()
    filler = "The quick brown fox jumps over the lazy dog near the river bank. " * 3
    history = [
        ChatMessage(session="t", role="user" if i % 2 == 0 else "assistant", text=f"{i}: {filler}") for i in range(20)
    ]
    try:
        deltas = [d async for d in small.stream(history + user("Thanks!"), request_id="r", max_tokens=8, watch=None)]
        assert deltas
        with pytest.raises(ValueError, match="exceed n_ctx"):
            [d async for d in small.stream(user(filler * 10), request_id="r", max_tokens=8, watch=None)]
        assert_idle(small)
    finally:
        await small.aclose()


def test_registry_builds_the_engine() -> None:
    llm = workers.llm.create("llamacpp", {"n_ctx": 512, "instances": 2})
    assert isinstance(llm, LlamaCppLlm) and llm.instances == 2
