"""In-process vLLM engine (GPU workers): continuous batching, prefix caching, abort on barge-in.

Builds `AsyncEngineArgs` and vLLM's V1 `AsyncLLM` (the version is pinned to
the OpenAI server's, compose/constraints-gpu.txt), renders the chat with the
model's own chat template and streams `engine.generate()` output deltas.

The prompt goes to vLLM as token ids, tokenized without special tokens, as
vLLM's OpenAI server does for chat: the template already starts with BOS
(Llama 3's `<|begin_of_text|>`), and a text prompt would be tokenized with
`add_special_tokens=True`, giving it a second one.

On cancel, cleanup runs every step even when one fails: `abort(request_id)`
(effective at the next scheduler step), then the task reading the engine is
cancelled and awaited, then the generator is closed. AsyncLLM only aborts on
cancellation once `add_request` has returned, and an abort that lands while
the request is still being tokenized or added finds nothing to abort, so when
no output had arrived before the first abort, abort is sent again once the
reader is gone.

`prefix` continues an assistant reply that was already published (a job
re-run after its worker died): vLLM is not batch-invariant, so generating the
reply again could give other tokens after the ones the caller already heard.

vLLM is imported only inside load() / stream(): it needs CUDA and cannot be
installed on the CPU development machines. `engine=` injects an already-built
engine; the tests also put a double of the `vllm` module in sys.modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from shared.cancel import CancelWatch
from shared.protocol import ChatMessage
from workers.llm.prompt import ChatDict, to_chat
from workers.llm.streaming import END, DeltaStream

log = logging.getLogger("voxbus.llm.vllm")


class VllmLlm:
    supports_prefix = True  # stream(prefix=...) continues a reply already published

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
        self._cleanups: set[asyncio.Future[None]] = set()

    async def load(self) -> None:
        if self.engine is None:
            try:
                self.engine = await asyncio.to_thread(self._build_engine)
            except ImportError as exc:
                raise RuntimeError(
                    f"the vllm engine needs vLLM ({exc.name} is missing): it runs on CUDA GPU workers only "
                    "(pip install 'voxbus[gpu]'); use the llamacpp or openai engine on CPU machines"
                ) from exc
        tokenizer = self.engine.get_tokenizer()  # a coroutine on some vLLM versions, a plain call on others
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer

    def _build_engine(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

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
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        log.info("vLLM engine ready in %.1f s", time.perf_counter() - t0)
        return engine

    async def aclose(self) -> None:
        if self.engine is not None and self._owns_engine:
            shutdown = getattr(self.engine, "shutdown", None)
            if shutdown is not None:
                await asyncio.to_thread(shutdown)
            self.engine = None

    def prompt_token_ids(self, messages: list[ChatMessage], prefix: str = "") -> list[int]:
        """The chat template's rendering, tokenized without adding special tokens (one BOS: the template's)."""
        chat: list[ChatDict] = to_chat(messages, self.system_prompt)
        if prefix:
            chat.append({"role": "assistant", "content": prefix})
            rendered = self._tokenizer.apply_chat_template(
                chat, add_generation_prompt=False, continue_final_message=True, tokenize=False)
        else:
            rendered = self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        if isinstance(rendered, list):  # vLLM's Mistral tokenizer always returns token ids
            return [int(t) for t in rendered]
        return [int(t) for t in self._tokenizer.encode(rendered, add_special_tokens=False)]

    def sampling_params(self, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(temperature=self.temperature, max_tokens=max_tokens,
                              repetition_penalty=self.repetition_penalty, output_kind=RequestOutputKind.DELTA)

    def stream(
        self, messages: list[ChatMessage], *, request_id: str, max_tokens: int, watch: CancelWatch | None,
        prefix: str = "",
    ) -> AsyncGenerator[str, None]:
        """Deltas of the reply; with `prefix`, of its continuation after that already-spoken text."""
        if self.engine is None or self._tokenizer is None:
            raise RuntimeError("VllmLlm.load() was not awaited")
        prompt = {"prompt_token_ids": self.prompt_token_ids(messages, prefix)}  # a vllm TokensPrompt
        return self._stream(prompt, self.sampling_params(max_tokens), request_id, watch)

    async def _stream(
        self, prompt: dict[str, Any], params: Any, request_id: str, watch: CancelWatch | None
    ) -> AsyncGenerator[str, None]:
        outputs = self.engine.generate(prompt, params, request_id)
        stream = DeltaStream(watch)
        seen = asyncio.Event()  # the engine produced an output: the request is registered
        # A pump task reads the engine so that a watch firing mid-step is acted on
        # at once (abort now, effective at the next scheduler step).
        pump = asyncio.ensure_future(self._pump(outputs, stream, seen))
        try:
            async with contextlib.aclosing(stream.items()) as items:
                async for item in items:
                    yield item
        finally:
            cleanup = asyncio.ensure_future(
                self._cleanup(request_id, outputs, pump, seen, completed=stream.outcome == "completed"))
            self._cleanups.add(cleanup)  # the loop keeps only a weak reference to a task
            cleanup.add_done_callback(self._cleanups.discard)
            # Shielded: a second cancel of the consumer must not leave the request running.
            await asyncio.shield(cleanup)

    async def _cleanup(
        self, request_id: str, outputs: Any, pump: asyncio.Future[None], seen: asyncio.Event, *, completed: bool
    ) -> None:
        registered = seen.is_set()
        if not completed:
            await self._abort(request_id)
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        try:
            await outputs.aclose()
        except Exception:
            log.warning("closing the vLLM output stream of %s failed", request_id, exc_info=True)
        if not completed and not registered:
            await self._abort(request_id)  # the add may have completed after the first abort

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:
            log.warning("vLLM abort(%s) failed", request_id, exc_info=True)

    @staticmethod
    async def _pump(outputs: Any, stream: DeltaStream, seen: asyncio.Event) -> None:
        try:
            async for out in outputs:
                seen.set()
                text = out.outputs[0].text
                if text:
                    stream.put(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stream.put(exc)
        finally:
            stream.put(END)
