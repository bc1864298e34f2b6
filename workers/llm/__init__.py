"""LLM engines: the interface and the registry (one line per engine)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from shared.cancel import CancelWatch
from shared.plugins import load_engine
from shared.protocol import ChatMessage

ENGINES: dict[str, str] = {
    "llamacpp": "workers.llm.llamacpp:LlamaCppLlm",
    "openai": "workers.llm.openai_compat:OpenAiLlm",
    "vllm": "workers.llm.vllm_engine:VllmLlm",
    "synthetic": "workers.llm.synthetic:SyntheticLlm",
}


class LlmEngine(Protocol):
    """Streams a reply token by token; stops within one decode step once `watch` is set.

    Optional class attributes say how a job re-run after a dead worker may go on (workers/stages/llm.py):
    `supports_prefix = True`: `stream(..., prefix=TEXT)` continues a reply after TEXT, already spoken;
    `deterministic = True`: a re-run decodes exactly the same tokens;
    `async def warm(system_prompt)`: prefill the system prompt the bridges send (the pool's
    `warm_prompt`) once at load, so the first turn finds it in the prompt cache."""

    async def load(self) -> None:
        """Load weights or open the client (heavy work off the event loop)."""

    def stream(
        self, messages: list[ChatMessage], *, request_id: str, max_tokens: int, watch: CancelWatch | None
    ) -> AsyncGenerator[str, None]:
        """Yield text deltas as they decode. Closing the iterator, or the watch firing,
        aborts the generation (vLLM abort, closing the HTTP stream, breaking the token loop)."""

    async def aclose(self) -> None:
        """Release the model / client."""


def create(name: str, options: dict[str, Any]) -> LlmEngine:
    engine: LlmEngine = load_engine(ENGINES, "llm", name, options)
    return engine
