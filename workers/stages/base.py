"""The base of every stage handler: the job loop is written once, here.

A stage implements `run(job, watch)`: its step (read the job's input, run the
engine, publish outputs as they come), returning when done or as soon as
`watch.cancelled`. `handle` wraps it: a job whose turn was cancelled while it
ran ends with a `Cancelled` event in the session's events and the CANCELLED
outcome; otherwise its outputs are flushed to Redis before the job is acked.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from shared import metrics, tracing
from shared.bus import BatchPublisher
from shared.cancel import CancelWatch
from shared.config import PoolConfig
from shared.protocol import Cancelled, JobOutcome, Keys, TurnMark

if TYPE_CHECKING:
    from opentelemetry.trace import Span


# Marks that measure a step ending at the moment they are made: with tracing on, each is
# also a span under the job's run span (`llm.ttft`, `tts.first_audio`, ...).
SPAN_MARKS = frozenset({"ttft", "first_audio", "first_clause", "token_hop"})


@dataclass(slots=True)
class StageContext:
    redis: aioredis.Redis
    publisher: BatchPublisher
    pool: PoolConfig
    worker_id: str
    spans: dict[int, Span] = field(default_factory=dict)  # id(job) -> its run span, while tracing

    def mark(self, job: Any, mark: str, value_ms: float) -> None:
        """A latency mark of the job's turn: into the session's events and the stage histogram."""
        self.publisher.publish_nowait(Keys.events(job.session), TurnMark(
            session=job.session, turn=job.turn, stage=self.pool.stage, mark=mark, value_ms=value_ms))
        metrics.STAGE_LATENCY_MS.labels(stage=self.pool.stage, mark=mark, pool=self.pool.name,
                                        gpu_type=self.pool.gpu_type).observe(value_ms)
        if mark in SPAN_MARKS:
            now = time.time()
            self.span(job, mark, now - value_ms / 1000, now)

    def span(self, job: Any, name: str, start: float, end: float) -> None:
        """A finished `<stage>.<name>` span under the job's run span (nothing when not tracing)."""
        parent = self.spans.get(id(job))
        if parent is not None:
            tracing.span_between(f"{self.pool.stage}.{name}", parent, start, end)


class StageHandler(ABC):
    """One stage's jobs around one engine, loaded once."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    async def load(self) -> None:  # noqa: B027  (optional: a stage whose engine needs no loading)
        """Load the engine (once, before the first job)."""

    async def aclose(self) -> None:  # noqa: B027  (optional)
        """Release the engine."""

    @abstractmethod
    async def run(self, job: Any, watch: CancelWatch) -> None:
        """Do the job, publishing its outputs; return early once `watch.cancelled`."""

    async def handle(self, job: Any, watch: CancelWatch) -> JobOutcome:
        await self.run(job, watch)
        if watch.cancelled:
            await self.ctx.publisher.publish(Keys.events(job.session), Cancelled(
                session=job.session, turn=job.turn, stage=self.ctx.pool.stage, reason=watch.reason or "cancel"))
            return JobOutcome.CANCELLED
        await self.ctx.publisher.flush()
        return JobOutcome.DONE
