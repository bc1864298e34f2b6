"""vLLM engine against a DOUBLE of vLLM's AsyncLLM: vLLM needs CUDA and cannot run on these CPU machines.

The double is as strict as the upstream behaviour the engine relies on
(vllm/v1/engine/async_llm.py, output_processor.py, vLLM 0.11):

- the `vllm` module is a double too: `generate()` rejects a params object
  that is not its `SamplingParams` (TypeError, like the input processor), and
  sends cumulative text unless `output_kind` is `RequestOutputKind.DELTA`;
- a text prompt is tokenized with `add_special_tokens=True`, and the
  tokenizer's chat template starts with BOS as Llama 3's does, so a rendered
  text prompt gets two BOS tokens;
- `generate()` is an async generator whose request is registered only after
  awaits (tokenizing off the loop, then adding to the engine core): an abort
  of a request id not registered yet is ignored, and a generator cancelled
  before `add_request` returned does not abort it;
- once registered, the request runs in the "engine core" (a task of its own),
  one scheduler step at a time, until it finishes or an abort takes effect
  between steps; `running` is what the engine core still computes;
- `abort()` awaits an RPC and can raise (`abort_failures`).

What these tests cannot show: real vLLM timings, batching or prefix caching
(ops/gpu/smoke.py on a GPU machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import sys
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import workers.llm
from shared.cancel import CancelWatch
from shared.protocol import ChatMessage
from workers.llm.vllm_engine import VllmLlm

REPLY = "The moon is Earth's only natural satellite and it shines by reflected sunlight tonight".split()
STEP_S = 0.01  # one scheduler step
ADD_S = 0.02  # engine_core.add_request_async: the request is registered, add_request has not returned
ABORT_RPC_S = 0.005
BOS_ID = 128000
SPECIAL = {"<|begin_of_text|>": BOS_ID, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")


# ---------------------------------------------------------------- the vllm module double


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int | None = 16
    repetition_penalty: float = 1.0
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


@pytest.fixture(autouse=True)
def vllm_double(monkeypatch: pytest.MonkeyPatch) -> None:
    vllm = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    vllm.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    sampling.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    sampling.RequestOutputKind = RequestOutputKind  # type: ignore[attr-defined]
    vllm.sampling_params = sampling  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)


# ---------------------------------------------------------------- the AsyncLLM double


@dataclass
class FakeCompletion:
    text: str
    token_ids: list[int] = field(default_factory=list)  # with DELTA: this step's tokens


@dataclass
class FakeRequestOutput:
    request_id: str
    outputs: list[FakeCompletion]
    finished: bool
    prompt_token_ids: list[int] = field(default_factory=list)


class FakeTokenizer:
    """Llama 3's chat template and tokenizer: the template starts with BOS, encode() adds one by default."""

    bos_token = "<|begin_of_text|>"
    bos_token_id = BOS_ID

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def apply_chat_template(
        self, chat: list[dict[str, str]], *, add_generation_prompt: bool = False,
        continue_final_message: bool = False, tokenize: bool = True, **kwargs: Any,
    ) -> str | list[int]:
        self.calls.append(([dict(m) for m in chat], dict(
            kwargs, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
            **({"continue_final_message": True} if continue_final_message else {}))))
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        text = self.bos_token + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in chat)
        if continue_final_message:
            text = text.removesuffix("<|eot_id|>")
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS_ID] if add_special_tokens else []
        for piece in _SPECIAL_RE.split(text):
            ids.extend([SPECIAL[piece]] if piece in SPECIAL else [ord(c) for c in piece])
        return ids

    def decode(self, ids: list[int]) -> str:
        names = {v: k for k, v in SPECIAL.items()}
        return "".join(names.get(i, chr(i) if i < 0x110000 else "?") for i in ids)


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue[FakeRequestOutput | None] = field(default_factory=asyncio.Queue)
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    steps: int = 0
    task: asyncio.Task[None] | None = None


@dataclass
class FakeAsyncLLM:
    """Double of vllm.v1.engine.async_llm.AsyncLLM (see the module docstring)."""

    async_tokenizer: bool = False  # some vLLM versions: `async def get_tokenizer()`
    stall_at_step: int | None = None  # that step never ends (a long prefill, a stuck batch)
    abort_failures: int = 0  # the first N abort() calls raise (the engine core unreachable)
    add_gate: asyncio.Event | None = None  # tokenizing the prompt waits for it
    on_abort: Callable[[], None] | None = None  # called as each abort() starts
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    requests: dict[str, FakeRequest] = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    abort_calls: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # aborts that stopped a running request
    closed_early: list[str] = field(default_factory=list)  # generators closed or cancelled mid-request
    adding: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> set[str]:
        return {rid for rid, r in self.requests.items()
                if r.task is not None and not r.task.done() and not r.abort.is_set()}

    @property
    def output_processor(self) -> Any:
        """vLLM's OutputProcessor, as far as ops/gpu/smoke.py reads it."""
        return types.SimpleNamespace(get_num_unfinished_requests=lambda: len(self.running))

    def steps(self, request_id: str) -> int:
        return self.requests[request_id].steps if request_id in self.requests else 0

    def get_tokenizer(self) -> Any:
        if self.async_tokenizer:
            async def later() -> FakeTokenizer:
                return self.tokenizer
            return later()
        return self.tokenizer

    async def generate(
        self, prompt: str | dict[str, Any], sampling_params: Any, request_id: str
    ) -> AsyncIterator[FakeRequestOutput]:
        added = False  # add_request returned (upstream: `q is not None`)
        try:
            if not isinstance(sampling_params, SamplingParams):
                raise TypeError("params must be either SamplingParams or PoolingParams")
            self.params.append(sampling_params)
            ids = self._tokenize(prompt)
            self.adding.set()
            if self.add_gate is not None:  # process_inputs_async: tokenizing in a thread
                await self.add_gate.wait()
            else:
                await asyncio.sleep(0)
            request = self._register(request_id, ids, sampling_params)
            await asyncio.sleep(ADD_S)
            added = True
            while (out := await request.queue.get()) is not None:
                yield out
                if out.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.closed_early.append(request_id)
            if added:
                await self.abort(request_id)
            raise

    def _tokenize(self, prompt: str | dict[str, Any]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            ids = list(prompt["prompt_token_ids"])
        else:
            raise TypeError(f"not a prompt vLLM accepts: {prompt!r}")
        self.prompts.append(ids)
        return ids

    def _register(self, request_id: str, ids: list[int], params: SamplingParams) -> FakeRequest:
        request = FakeRequest(request_id, ids, params)
        self.requests[request_id] = request
        request.task = asyncio.ensure_future(self._engine_core(request))
        return request

    async def _engine_core(self, request: FakeRequest) -> None:
        n = min(request.params.max_tokens or len(REPLY), len(REPLY))
        text = ""
        try:
            for i in range(n):
                await asyncio.sleep(STEP_S)
                if i == self.stall_at_step:
                    await request.abort.wait()
                if request.abort.is_set():
                    return  # the abort took effect between steps
                request.steps += 1
                delta = (" " if i else "") + REPLY[i]
                text += delta
                out = delta if request.params.output_kind is RequestOutputKind.DELTA else text
                completion = FakeCompletion(out, [1000 + i] if request.params.output_kind is RequestOutputKind.DELTA
                                            else list(range(1000, 1001 + i)))
                request.queue.put_nowait(
                    FakeRequestOutput(request.request_id, [completion], i == n - 1, request.prompt_token_ids))
        finally:
            request.queue.put_nowait(None)

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)
        if self.on_abort is not None:
            self.on_abort()
        if self.abort_failures > 0:
            self.abort_failures -= 1
            raise RuntimeError("engine core unreachable")
        request = self.requests.get(request_id)  # output_processor.abort_requests: unknown ids are dropped
        await asyncio.sleep(ABORT_RPC_S)  # engine_core.abort_requests_async
        if request is not None and request.task is not None and not request.task.done() and not request.abort.is_set():
            request.abort.set()
            self.aborted.append(request_id)


# ---------------------------------------------------------------- helpers


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


async def settled(fake: FakeAsyncLLM) -> None:
    """Let the engine core run two more steps: an un-aborted request would show."""
    await asyncio.sleep(2 * STEP_S + ADD_S)


# ---------------------------------------------------------------- streaming


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
    assert fake.abort_calls == [] and fake.closed_early == [] and not fake.running


async def test_the_prompt_has_exactly_one_bos() -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake)
    [d async for d in engine.stream(messages(), request_id="s-bos", max_tokens=2, watch=None)]
    ids = fake.prompts[-1]
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID, fake.tokenizer.decode(ids[:8])
    assert fake.tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


async def test_max_tokens_is_passed_to_the_engine() -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake)
    deltas = [d async for d in engine.stream(messages(), request_id="s-2", max_tokens=3, watch=None)]
    assert len(deltas) == 3


async def test_a_prefix_continues_the_reply_already_spoken() -> None:
    fake = FakeAsyncLLM()
    engine = await loaded(fake)
    [d async for d in engine.stream(messages(), request_id="s-pre", max_tokens=2, watch=None, prefix="The moon is")]
    chat, kwargs = fake.tokenizer.calls[-1]
    assert chat[-1] == {"role": "assistant", "content": "The moon is"}
    assert kwargs == {"add_generation_prompt": False, "tokenize": False, "continue_final_message": True}
    ids = fake.prompts[-1]
    assert ids.count(BOS_ID) == 1
    assert fake.tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe moon is")


def test_the_double_rejects_a_params_object_of_another_type() -> None:
    fake = FakeAsyncLLM()

    async def first() -> None:
        await anext(fake.generate({"prompt_token_ids": [BOS_ID]}, object(), "x"))

    with pytest.raises(TypeError, match="SamplingParams"):
        asyncio.run(first())


# ---------------------------------------------------------------- cancel and cleanup


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
            steps_at_fire = fake.steps("s-3")
    assert k <= len(received) <= k + 1
    assert fake.aborted == ["s-3"]
    assert fake.steps("s-3") <= steps_at_fire + 1
    assert not fake.running  # the generator was closed too
    await settled(fake)
    assert fake.steps("s-3") <= steps_at_fire + 1


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
    assert fake.steps("s-5") <= 2 and not fake.running


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


async def test_an_abort_that_raises_does_not_skip_the_rest_of_the_cleanup() -> None:
    fake = FakeAsyncLLM(abort_failures=1)
    engine = await loaded(fake)
    received: list[str] = []
    async with contextlib.aclosing(engine.stream(messages(), request_id="s-raise", max_tokens=64, watch=None)) as s:
        async for delta in s:
            received.append(delta)
            if len(received) == 2:
                break  # aclosing closes the stream (as the LLM stage does): the first abort raises
    assert fake.abort_calls[0] == "s-raise" and len(fake.abort_calls) >= 2
    assert not fake.running, "the request went on generating after a failed abort"
    await settled(fake)
    assert fake.steps("s-raise") <= 3


async def test_a_cancel_while_the_request_is_being_added_aborts_it_once_added() -> None:
    gate = asyncio.Event()
    fake = FakeAsyncLLM(add_gate=gate, on_abort=gate.set)  # tokenizing ends while the first abort is in flight
    engine = await loaded(fake)
    watch = CancelWatch("t", 1)

    async def consume() -> list[str]:
        return [d async for d in engine.stream(messages(), request_id="s-add", max_tokens=64, watch=watch)]

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(fake.adding.wait(), timeout=5)
    watch.fire("barge-in")
    assert await asyncio.wait_for(task, timeout=5) == []
    assert "s-add" in fake.requests, "the double did not register the request (test set-up)"
    assert not fake.running, "the request was added after the abort and never aborted"
    await settled(fake)
    assert fake.steps("s-add") <= 1


async def test_older_vllm_with_an_async_get_tokenizer() -> None:
    fake = FakeAsyncLLM(async_tokenizer=True)
    engine = await loaded(fake)
    assert [d async for d in engine.stream(messages(), request_id="s-7", max_tokens=2, watch=None)] == REPLY[:1] + [
        " " + REPLY[1]
    ]


async def test_without_vllm_installed_load_says_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("vllm", "vllm.sampling_params", "vllm.engine", "vllm.engine.arg_utils"):
        monkeypatch.setitem(sys.modules, name, None)  # `import vllm...` raises ModuleNotFoundError
    engine = VllmLlm(model="some/model")
    with pytest.raises(RuntimeError, match="GPU"):
        await engine.load()


def test_registry_builds_the_engine() -> None:
    engine = workers.llm.create("vllm", {"model": "some/model", "max_model_len": 4096})
    assert isinstance(engine, VllmLlm) and engine.max_model_len == 4096
