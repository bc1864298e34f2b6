"""Stage handlers: the glue between a pool's jobs, the session streams and an engine.

A handler loads its engine once and runs one job at a time per call to
`handle`; the worker runtime (workers/runtime.py) decides how many run at once.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

from shared import metrics
from shared.bus import BatchPublisher
from shared.cancel import CancelWatch
from shared.config import PoolConfig
from shared.protocol import Keys, TurnMark

HANDLERS: dict[str, str] = {
    "asr": "workers.stages.asr:AsrStage",
    "llm": "workers.stages.llm:LlmStage",
    "tts": "workers.stages.tts:TtsStage",
    "eot": "workers.stages.eot:EotStage",
}


class Outcome(enum.Enum):
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class StageContext:
    redis: aioredis.Redis
    publisher: BatchPublisher
    pool: PoolConfig
    worker_id: str

    def mark(self, job: Any, mark: str, value_ms: float) -> None:
        """A latency mark of the job's turn: into the session's events and the stage histogram."""
        self.publisher.publish_nowait(Keys.events(job.session), TurnMark(
            session=job.session, turn=job.turn, stage=self.pool.stage, mark=mark, value_ms=value_ms))
        metrics.STAGE_LATENCY_MS.labels(stage=self.pool.stage, mark=mark, pool=self.pool.name,
                                        gpu_type=self.pool.gpu_type).observe(value_ms)


class StageHandler(Protocol):
    async def load(self) -> None: ...

    async def handle(self, job: Any, watch: CancelWatch) -> Outcome: ...

    async def close(self) -> None: ...


def create_handler(ctx: StageContext, engine: Any | None = None) -> StageHandler:
    """The handler for `ctx.pool.stage`; `engine` overrides the configured one (tests, benches)."""
    module, _, cls = HANDLERS[ctx.pool.stage].partition(":")
    return getattr(importlib.import_module(module), cls)(ctx, engine)
