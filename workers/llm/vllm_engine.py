"""In-process vLLM engine (GPU workers): continuous batching, prefix caching, abort on barge-in.

Builds `AsyncEngineArgs` and an `AsyncLLM` (the V1 engine; `AsyncLLMEngine`
on older vLLM), renders the chat with the model's own chat template and
streams `engine.generate()` output deltas. On cancel it calls
`engine.abort(request_id)`, which takes effect between scheduler steps (one
decode step), then closes the generator (AsyncLLM also aborts on close).

vLLM is imported only inside load(): it needs CUDA and cannot be installed on
the CPU development machines. `engine=` injects an already-built engine (or a
test double that implements the same contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shared.cancel import CancelWatch
from shared.protocol import ChatMessage
from workers.llm.prompt import ChatDict, to_chat
from workers.llm.streaming import END, DeltaStream

log = logging.getLogger("voxbus.llm.vllm")



@dataclass
class PlainSamplingParams:
    """Stand-in for vllm.SamplingParams when an injected engine runs without vLLM installed."""

    temperature: float
    max_tokens: int
    repetition_penalty: float = 1.0
    output_kind: str = "delta"


class VllmLlm:
    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_num_batched_tokens: int | None = None,
        speculative_config: dict[str, Any] | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        temperature: float = 0.0,
        repetition_penalty: float = 1.1,
        system_prompt: str | None = None,
        engine: Any = None,
    ) -> None:
        self.model = model
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_num_batched_tokens = max_num_batched_tokens
        self.speculative_config = speculative_config
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty  # > 1 discourages repeats: greedy decoding loops without it
        self.system_prompt = system_prompt
        self.engine = engine
        self._owns_engine = engine is None
        self._tokenizer: Any = None

    async def load(self) -> None:
        if self.engine is None:
            try:
                self.engine = await asyncio.to_thread(self._build_engine)
            except ImportError as exc:
                raise RuntimeError(
                    f"the vllm engine needs vLLM ({exc.name} is missing): it runs on CUDA GPU workers only "
                    "(pip install 'voxbus[gpu]'); use the llamacpp or openai engine on CPU machines"
                ) from exc
        tokenizer = self.engine.get_tokenizer()  # a coroutine on older vLLM, a plain call on newer
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer

    def _build_engine(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        from shared.models import resolve

        args: dict[str, Any] = dict(
            model=resolve(self.model),
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_chunked_prefill=self.enable_chunked_prefill,
            dtype=self.dtype,
        )
        if self.max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        if self.speculative_config is not None:
            args["speculative_config"] = self.speculative_config
        t0 = time.perf_counter()
        log.info("starting vLLM engine for %s (tp=%d)", args["model"], self.tensor_parallel_size)
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        except ImportError:  # vLLM before the V1 engine
            from vllm import AsyncLLMEngine

            engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))
        log.info("vLLM engine ready in %.1f s", time.perf_counter() - t0)
        return engine

    async def aclose(self) -> None:
        if self.engine is not None and self._owns_engine:
            shutdown = getattr(self.engine, "shutdown", None)
            if shutdown is not None:
                await asyncio.to_thread(shutdown)
            self.engine = None

    def prompt(self, messages: list[ChatMessage]) -> str:
        chat: list[ChatDict] = to_chat(messages, self.system_prompt)
        return self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def sampling_params(self, max_tokens: int) -> tuple[Any, bool]:
        """(params, deltas): deltas is False on vLLM without RequestOutputKind, whose outputs are cumulative."""
        try:
            from vllm import SamplingParams
        except ImportError:
            if self._owns_engine:
                raise
            return PlainSamplingParams(self.temperature, max_tokens, self.repetition_penalty), True
        try:
            from vllm.sampling_params import RequestOutputKind
        except ImportError:
            return SamplingParams(temperature=self.temperature, max_tokens=max_tokens,
                                  repetition_penalty=self.repetition_penalty), False
        return SamplingParams(temperature=self.temperature, max_tokens=max_tokens,
                              repetition_penalty=self.repetition_penalty, output_kind=RequestOutputKind.DELTA), True

    def stream(
        self, messages: list[ChatMessage], *, request_id: str, max_tokens: int, watch: CancelWatch | None
    ) -> AsyncIterator[str]:
        if self.engine is None or self._tokenizer is None:
            raise RuntimeError("VllmLlm.load() was not awaited")
        params, deltas = self.sampling_params(max_tokens)
        return self._stream(self.prompt(messages), params, deltas, request_id, watch)

    async def _stream(
        self, prompt: str, params: Any, deltas: bool, request_id: str, watch: CancelWatch | None
    ) -> AsyncIterator[str]:
        outputs = self.engine.generate(prompt, params, request_id)
        stream = DeltaStream(watch)
        # A pump task reads the engine so that a watch firing mid-step is acted on
        # at once (abort now, effective at the next scheduler step).
        pump = asyncio.ensure_future(self._pump(outputs, deltas, stream))
        try:
            async with contextlib.aclosing(stream.items()) as items:
                async for item in items:
                    yield item
        finally:
            if stream.outcome != "completed":
                await self.engine.abort(request_id)
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            await outputs.aclose()

    @staticmethod
    async def _pump(outputs: Any, deltas: bool, stream: DeltaStream) -> None:
        seen = 0
        try:
            async for out in outputs:
                text = out.outputs[0].text
                if not deltas:
                    text, seen = text[seen:], len(text)
                if text:
                    stream.put(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stream.put(exc)
        finally:
            stream.put(END)
