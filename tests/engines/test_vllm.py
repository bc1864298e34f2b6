"""vLLM engine against a DOUBLE of vLLM's AsyncLLM: vLLM needs CUDA and cannot run on these CPU machines.

The double implements the documented contract the engine relies on:
`generate(prompt, sampling_params, request_id)` is an async generator yielding
RequestOutput-like objects (`.outputs[0].text` is the new text with
RequestOutputKind.DELTA, `.finished`) one scheduler step at a time, with a
fixed step time; `abort(request_id)` takes effect between steps; closing or
cancelling the generator also aborts (as AsyncLLM does); `get_tokenizer()`
returns a tokenizer with `apply_chat_template`. What these tests cannot show:
real vLLM timings, batching or prefix caching (run the GPU pool for that).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import workers.llm
from shared.cancel import CancelWatch
from shared.protocol import ChatMessage
from workers.llm.vllm_engine import VllmLlm

REPLY = "The moon is Earth's only natural satellite and it shines by reflected sunlight tonight".split()
STEP_S = 0.01


@dataclass
class FakeCompletion:
    text: str


@dataclass
class FakeRequestOutput:
    request_id: str
    outputs: list[FakeCompletion]
    finished: bool


class FakeTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def apply_chat_template(self, chat: list[dict[str, str]], **kwargs: Any) -> str:
        self.calls.append((chat, kwargs))
        return "".join(f"<|{m['role']}|>{m['content']}" for m in chat) + "<|assistant|>"


@dataclass
class FakeAsyncLLM:
    """Double of vllm.v1.engine.async_llm.AsyncLLM (see the module docstring)."""

    async_tokenizer: bool = False  # vLLM < 0.10: `async def get_tokenizer()`
    stall_at_step: int | None = None  # that step never ends (a long prefill, a stuck batch)
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    steps: dict[str, int] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)  # explicit abort() calls
    closed_early: list[str] = field(default_factory=list)  # generators closed or cancelled mid-request
    running: set[str] = field(default_factory=set)
    params: list[Any] = field(default_factory=list)
    _stop: set[str] = field(default_factory=set)

    def get_tokenizer(self) -> Any:
        if self.async_tokenizer:
            async def later() -> FakeTokenizer:
                return self.tokenizer
            return later()
        return self.tokenizer

    async def generate(self, prompt: str, sampling_params: Any, request_id: str) -> AsyncIterator[FakeRequestOutput]:
        self.params.append(sampling_params)
        self.running.add(request_id)
        self.steps[request_id] = 0
        try:
            n = min(sampling_params.max_tokens, len(REPLY))
            for i in range(n):
                await asyncio.sleep(STEP_S)  # one scheduler step
                if i == self.stall_at_step:
                    await asyncio.Event().wait()
                if request_id in self._stop:
                    return  # the abort took effect between steps
                self.steps[request_id] += 1
                yield FakeRequestOutput(request_id, [FakeCompletion((" " if i else "") + REPLY[i])], i == n - 1)
        except (asyncio.CancelledError, GeneratorExit):
            self.closed_early.append(request_id)  # AsyncLLM aborts the request here
            raise
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._stop.add(request_id)


def messages(text: str = "Tell me about the moon.") -> list[ChatMessage]:
    return [
        ChatMessage(session="t", role="user", text="Hi"),
        ChatMessage(session="t", role="assistant", text="Hello! How can I help?"),
        ChatMessage(session="t", role="user", text=text),
    ]


async def loaded(fake: FakeAsyncLLM, **options: Any) -> VllmLlm:
    engine = VllmLlm(model="unused-by-the-double", engine=fake, **options)
    await engine.load()
    return engine


async def test_streams_deltas_rendered_with_the_chat_template() -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake, system_prompt="Be brief.", temperature=0.0)
    deltas = [d async for d in engine.stream(messages(), request_id="s-1", max_tokens=64, watch=None)]
    assert "".join(deltas) == " ".join(REPLY)
    assert len(deltas) == len(REPLY)
    chat, kwargs = fake.tokenizer.calls[-1]
    assert chat[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert kwargs == {"add_generation_prompt": True, "tokenize": False}
    assert fake.params[-1].max_tokens == 64 and fake.params[-1].temperature == 0.0
    assert fake.aborted == [] and fake.closed_early == [] and not fake.running


async def test_max_tokens_is_passed_to_the_engine() -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake)
    deltas = [d async for d in engine.stream(messages(), request_id="s-2", max_tokens=3, watch=None)]
    assert len(deltas) == 3


@pytest.mark.parametrize("k", [1, 4])
async def test_cancel_aborts_the_request_within_one_step(k: int) -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake)
    watch = CancelWatch("t", 1)
    received: list[str] = []
    async for delta in engine.stream(messages(), request_id="s-3", max_tokens=64, watch=watch):
        received.append(delta)
        if len(received) == k:
            watch.fire("barge-in")
            steps_at_fire = fake.steps["s-3"]
    assert k <= len(received) <= k + 1
    assert fake.aborted == ["s-3"]
    assert fake.steps["s-3"] <= steps_at_fire + 1
    assert not fake.running  # the generator was closed too


async def test_a_watch_firing_mid_step_stops_the_consumer_at_once() -> None:
    fake = FakeAsyncLLM(stall_at_step=2)
    engine = await loaded(fake)
    watch = CancelWatch("t", 1)
    received: list[str] = []

    async def consume() -> None:
        async for delta in engine.stream(messages(), request_id="s-4", max_tokens=64, watch=watch):
            received.append(delta)
            if len(received) == 2:
                asyncio.get_running_loop().call_later(0.05, watch.fire, "barge-in")  # while step 3 runs

    await asyncio.wait_for(consume(), timeout=10)  # without the watch the stalled step would never end
    assert len(received) == 2
    assert fake.aborted == ["s-4"] and fake.closed_early == ["s-4"] and not fake.running


async def test_closing_the_iterator_aborts_the_request() -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake)
    stream = engine.stream(messages(), request_id="s-5", max_tokens=64, watch=None)
    assert await anext(stream) == REPLY[0]
    await stream.aclose()
    assert fake.aborted == ["s-5"]
    assert fake.steps["s-5"] <= 2 and not fake.running


async def test_cancelling_the_consuming_task_aborts_the_request() -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(messages(), request_id="s-6", max_tokens=64, watch=None):
            first.set()

    task = asyncio.ensure_future(consume())
    await first.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert fake.aborted == ["s-6"] and not fake.running


async def test_older_vllm_with_an_async_get_tokenizer() -> None:
    fake = FakeAsyncLLM(async_tokenizer=True)
    engine = await loaded(fake)
    assert [d async for d in engine.stream(messages(), request_id="s-7", max_tokens=2, watch=None)] == REPLY[:1] + [
        " " + REPLY[1]
    ]


async def test_without_vllm_installed_load_says_where_it_runs() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    engine = VllmLlm(model="some/model")
    with pytest.raises(RuntimeError, match="GPU"):
        await engine.load()


def test_registry_builds_the_engine() -> None:
    engine = workers.llm.create("vllm", {"model": "some/model", "max_model_len": 4096})
    assert isinstance(engine, VllmLlm) and engine.max_model_len == 4096
