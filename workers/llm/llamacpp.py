"""llama.cpp LLM engine (llama-cpp-python): streams tokens from a local GGUF model.

Decoding runs in worker threads, one per `Llama` instance (a `Llama` object is
not thread-safe, so each instance serves one generation at a time). Every
delta is handed to the event loop as soon as it decodes. The thread checks a
stop flag before decoding the next token, so a cancel watch firing, or the
consumer closing the iterator, stops generation within one token, and the
instance is back in the pool when the iterator has finished closing.

The system prompt stays warm: llama.cpp reuses the KV cache of the longest
common token prefix between calls, and `to_chat` puts the system prompt first
and identical, so a new turn only evaluates the new messages; `warm()` prefills
the bridges' system prompt at load, so the first caller finds it there too. Replies are
deterministic whatever the cache holds: floating-point results depend on how
the prompt is split into batches, so the reused prefix is rounded down to a
multiple of `n_batch` and the rest is evaluated in batches aligned the same
way as on a cold cache (a re-run job on another worker reproduces its tokens).
A smaller `n_batch` reuses more of the prefix, a larger one prefills long
prompts faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.cancel import CancelWatch
from shared.models import resolve
from shared.protocol import ChatMessage
from workers.llm.ggml_cpu import load_cpu_backend
from workers.llm.prompt import ChatDict, to_chat
from workers.llm.streaming import END, DeltaStream

log = logging.getLogger("voxbus.llm.llamacpp")

_TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers and separators, a safe overestimate


@dataclass
class GenerationStats:
    """What one generation cost; `prompt_tokens_evaluated` shows the prefix-cache reuse."""

    request_id: str
    prompt_tokens_evaluated: int = 0
    tokens: int = 0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    stopped: str = ""  # "" (finished), "cancelled" (watch), "closed" (consumer went away) or "error"

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / (self.decode_ms / 1000) if self.tokens > 1 and self.decode_ms > 0 else 0.0


class LlamaCppLlm:
    deterministic = True  # a re-run decodes the same tokens (see above): re-running a job is safe

    def __init__(
        self,
        model: str = "bundled:smollm2-135m-instruct",
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        temperature: float = 0.0,
        repeat_penalty: float = 1.15,
        seed: int = 0,
        system_prompt: str | None = None,
        chat_format: str | None = None,
        instances: int = 1,
        warmup: bool = True,
        n_batch: int = 32,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self.model = model
        self.n_ctx = n_ctx
        self.n_threads = n_threads  # decoding (llama-cpp-python's default: half the cores)
        self.n_threads_batch = n_threads_batch  # prompt evaluation (default: every core)
        self.temperature = temperature
        # > 1 penalises tokens seen in the last 64: greedy decoding of a small model loops without it.
        # Deterministic (no sampling), so a re-run job still reproduces its tokens.
        self.repeat_penalty = repeat_penalty
        self.seed = seed
        self.system_prompt = system_prompt
        self.chat_format = chat_format
        self.instances = instances
        self.warmup = warmup
        self.n_batch = n_batch
        self.last_stats: GenerationStats | None = None  # of the latest stream, updated as it decodes
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._llamas: list[Any] = []
        self._executor: ThreadPoolExecutor | None = None

    async def load(self) -> None:
        if self._llamas:
            return
        await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> None:
        load_cpu_backend()
        Llama = _aligned_llama_class()
        path = resolve(self.model)
        t0 = time.perf_counter()
        for i in range(self.instances):
            log.info("loading llama.cpp model %s (instance %d/%d)", path, i + 1, self.instances)
            llm = Llama(
                model_path=path,
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads_batch,
                seed=self.seed,
                n_batch=self.n_batch,
                chat_format=self.chat_format,
                verbose=False,
            )
            if self.warmup:
                # Runs the first (slow) decode now rather than in the first caller's turn.
                self._warm(llm, self.system_prompt)
            self._llamas.append(llm)
            self._free.put(llm)
        self._executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix="llamacpp")
        log.info("llama.cpp model ready: %d instance(s) in %.2f s", self.instances, time.perf_counter() - t0)

    async def warm(self, system_prompt: str) -> None:
        """Leave `system_prompt` (the one the bridges send) in every instance's KV cache.

        Nothing to do when the engine has its own `system_prompt`: that one goes first whatever the
        bridge sends, and the load already warmed it."""
        if self.system_prompt or not self.warmup:
            return
        t0 = time.perf_counter()
        for llm in self._llamas:
            await asyncio.to_thread(self._warm, llm, system_prompt)
        log.info("llama.cpp prompt cache warmed with the system prompt in %.0f ms", (time.perf_counter() - t0) * 1000)

    def _warm(self, llm: Any, system_prompt: str | None) -> None:
        chat = to_chat([], system_prompt) + [{"role": "user", "content": "Hi"}]
        self._run(llm, chat, 1, lambda: False, lambda _: None, GenerationStats("warmup"))

    async def aclose(self) -> None:
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None
        for llm in self._llamas:
            llm.close()
        self._llamas.clear()
        self._free = queue.SimpleQueue()

    @property
    def free_instances(self) -> int:
        """Llama instances not running a generation right now."""
        return self._free.qsize()

    def count_tokens(self, text: str) -> int:
        if not self._llamas:
            raise RuntimeError("LlamaCppLlm.load() was not awaited")
        return len(self._llamas[0].tokenize(text.encode(), add_bos=False))  # reads the vocabulary only

    def stream(
        self, messages: list[ChatMessage], *, request_id: str, max_tokens: int, watch: CancelWatch | None
    ) -> AsyncGenerator[str, None]:
        return self._stream(to_chat(messages, self.system_prompt), request_id, max_tokens, watch)

    async def _stream(
        self, chat: list[ChatDict], request_id: str, max_tokens: int, watch: CancelWatch | None
    ) -> AsyncGenerator[str, None]:
        if self._executor is None:
            raise RuntimeError("LlamaCppLlm.load() was not awaited")
        loop = asyncio.get_running_loop()
        stream = DeltaStream(watch)
        closed = threading.Event()
        stats = self.last_stats = GenerationStats(request_id)

        def should_stop() -> bool:
            # Read from the decode thread: both are plain flag reads.
            return closed.is_set() or (watch is not None and watch.cancelled)

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(stream.put, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                closed.set()

        def work() -> None:
            llm = self._free.get()
            try:
                self._run(llm, chat, max_tokens, should_stop, emit, stats)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)
            finally:
                self._free.put(llm)
                emit(END)

        done = loop.run_in_executor(self._executor, work)
        try:
            async with contextlib.aclosing(stream.items()) as items:
                async for item in items:
                    yield item
        finally:
            closed.set()
            try:
                await asyncio.shield(done)  # the instance is free again once this returns
            except asyncio.CancelledError:
                pass
            if watch is not None and watch.cancelled:
                stats.stopped = "cancelled"
            elif stream.outcome in ("error", "closed"):
                stats.stopped = stream.outcome

    def _run(
        self,
        llm: Any,
        chat: list[ChatDict],
        max_tokens: int,
        should_stop: Callable[[], bool],
        emit: Callable[[Any], None],
        stats: GenerationStats,
    ) -> None:
        """One generation on `llm`, in the calling thread."""
        import llama_cpp

        if should_stop():
            return
        chat = self._fit(llm, chat, max_tokens)
        llama_cpp.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        first = 0.0
        chunks = llm.create_chat_completion(
            chat, stream=True, temperature=self.temperature, seed=self.seed, max_tokens=max_tokens,
            repeat_penalty=self.repeat_penalty,
        )
        try:
            # The check sits before each next(): next() is what decodes a token.
            while not should_stop():
                chunk = next(chunks, None)
                if chunk is None:
                    break
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    if not stats.tokens:
                        first = time.perf_counter()
                        stats.ttft_ms = (first - t0) * 1000
                    stats.tokens += 1
                    emit(delta)
        finally:
            chunks.close()
            if stats.tokens:
                stats.decode_ms = (time.perf_counter() - first) * 1000
            stats.prompt_tokens_evaluated = llama_cpp.llama_perf_context(llm.ctx).n_p_eval

    def _fit(self, llm: Any, chat: list[ChatDict], max_tokens: int) -> list[ChatDict]:
        """Drop the oldest non-system messages, in one chunk, when prompt + reply would overflow the window."""
        budget = self.n_ctx - max_tokens
        sizes = [len(llm.tokenize(m["content"].encode(), add_bos=False)) + _TEMPLATE_TOKENS_PER_MESSAGE for m in chat]
        chat = list(chat)
        first = 1 if chat and chat[0]["role"] == "system" else 0
        if sum(sizes) > budget:
            # Down to 60% in one go, not a message per turn: the next turns then share this prefix
            # and reuse its KV cache (the bridge bounds the context the same way, well before this).
            while sum(sizes) > budget * 0.6 and len(chat) - first > 1:
                del chat[first], sizes[first]
        if sum(sizes) > budget:
            raise ValueError(f"prompt of ~{sum(sizes)} tokens + max_tokens {max_tokens} exceed n_ctx {self.n_ctx}")
        return chat


def _aligned_llama_class() -> type:
    """`Llama` whose prompt evaluation is laid out in batches aligned to multiples of n_batch."""
    from llama_cpp import Llama

    class AlignedLlama(Llama):
        def generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("reset", True) and self.n_tokens > 0:
                n = min(self.n_tokens, len(tokens) - 1)  # at least one prompt token is evaluated
                differ = np.flatnonzero(self._input_ids[:n] != np.asarray(tokens[:n]))
                keep = int(differ[0]) if differ.size else n
                keep -= keep % self.n_batch
                if keep < self.n_tokens:
                    # Without partial removal (some architectures) start from an empty cache.
                    self.n_tokens = keep if self._ctx.kv_cache_seq_rm(-1, keep, -1) else 0
            return super().generate(tokens, *args, **kwargs)

    return AlignedLlama
