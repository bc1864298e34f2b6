"""Stage handlers: the glue between a pool's jobs, the session streams and an engine.

`StageHandler` (base.py) owns the loop around a job: skipping work once its
turn is cancelled, the `Cancelled` event, latency marks, flushing outputs.
Each stage (asr, llm, tts, eot) implements only its step, `run`. The worker
runtime (workers/runtime.py) decides how many jobs run at once.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import StageContext, StageHandler

HANDLERS: dict[str, str] = {
    "asr": "workers.stages.asr:AsrStage",
    "llm": "workers.stages.llm:LlmStage",
    "tts": "workers.stages.tts:TtsStage",
    "eot": "workers.stages.eot:EotStage",
}

__all__ = ["HANDLERS", "StageContext", "StageHandler", "create_handler"]


def create_handler(ctx: StageContext, engine: Any | None = None) -> StageHandler:
    """The handler for `ctx.pool.stage`; `engine` overrides the configured one (tests, benches)."""
    module, _, cls = HANDLERS[ctx.pool.stage].partition(":")
    handler: StageHandler = getattr(importlib.import_module(module), cls)(ctx, engine)
    return handler
