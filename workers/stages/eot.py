"""End-of-turn stage: read the utterance so far from audio.in, ask the model, publish its verdict.

The bridge sends a job at each pause in a caller's speech; the verdict
(`EotDecision`: the probability that the caller has finished) goes to the
session's events, where the bridge's turn machine reads it. Jobs that arrive
together, from any sessions, are scored in one batched model call.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from shared import opus
from shared.cancel import CancelWatch
from shared.protocol import EotDecision, EotJob, Keys
from workers import eot as eot_engines
from workers.stages.base import StageContext, StageHandler
from workers.stages.batching import Batcher
from workers.stages.frames import read_frames


class EotStage(StageHandler):
    def __init__(self, ctx: StageContext, engine: eot_engines.EotEngine | None = None) -> None:
        super().__init__(ctx)
        self.engine = engine or eot_engines.create(ctx.pool.engine, dict(ctx.pool.options))
        self._batcher: Batcher[np.ndarray, float] = Batcher(self._predict_batch)

    async def load(self) -> None:
        await asyncio.to_thread(self.engine.load)
        await asyncio.to_thread(opus.warm_up)

    async def aclose(self) -> None:
        await self._batcher.aclose()

    def _predict_batch(self, audios: list[np.ndarray]) -> list[float]:
        return [float(p) for p in np.asarray(self.engine.predict(audios), dtype=np.float64).reshape(-1)]

    async def run(self, job: EotJob, watch: CancelWatch) -> None:
        t0 = time.perf_counter()
        audio = await read_frames(self.ctx.redis, job.session, job.start_seq, job.end_seq, turn=job.turn)
        if audio.size == 0:
            raise ValueError(f"no audio for frames {job.start_seq}..{job.end_seq} of session {job.session}")
        prob = await self._batcher.submit(audio)
        cost_ms = (time.perf_counter() - t0) * 1000
        if watch.cancelled:
            return
        self.ctx.publisher.publish_nowait(Keys.events(job.session), EotDecision(
            session=job.session, turn=job.turn, prob=round(prob, 5),
            start_frame=job.start_seq, end_frame=job.end_seq, cost_ms=round(cost_ms, 2)))
        self.ctx.mark(job, "done", cost_ms)
