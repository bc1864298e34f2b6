"""ASR stage: read an utterance's frames from audio.in by id range, transcribe, publish.

Jobs carry references, not audio: [start_seq, end_seq] of the session's
audio.in, read with one XRANGE thanks to explicit frame ids. Jobs that arrive
together are transcribed as one batch (GPU engines batch them for real).
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from shared import opus
from shared.cancel import CancelWatch
from shared.protocol import AsrJob, Keys, Transcript
from workers import asr as asr_engines
from workers.stages.base import StageContext, StageHandler
from workers.stages.batching import Batcher
from workers.stages.frames import read_frames

log = logging.getLogger("voxbus.stage.asr")


class AsrStage(StageHandler):
    def __init__(self, ctx: StageContext, engine: asr_engines.AsrEngine | None = None) -> None:
        super().__init__(ctx)
        self.engine = engine or asr_engines.create(ctx.pool.engine, dict(ctx.pool.options))
        # One language per batch: a batched transcription takes (or detects) one for all its inputs.
        self._batcher: Batcher[tuple[np.ndarray, str | None], asr_engines.AsrResult] = Batcher(
            self._transcribe_batch, key=lambda item: item[1])

    async def load(self) -> None:
        await asyncio.to_thread(self.engine.load)
        await asyncio.to_thread(opus.warm_up)

    async def aclose(self) -> None:
        await self._batcher.aclose()

    async def read_audio(self, job: AsrJob) -> np.ndarray:
        """The job's frames as float32 samples; missing frames (trimmed, lost) become silence."""
        return await read_frames(self.ctx.redis, job.session, job.start_seq, job.end_seq, turn=job.turn)

    def _transcribe_batch(self, items: list[tuple[np.ndarray, str | None]]) -> list[asr_engines.AsrResult]:
        language = items[0][1]
        if len(items) == 1:
            return [self.engine.transcribe(items[0][0], language)]
        return list(self.engine.transcribe_batch([audio for audio, _ in items], language))

    async def run(self, job: AsrJob, watch: CancelWatch) -> None:
        t0 = time.perf_counter()
        audio = await self.read_audio(job)
        if audio.size == 0:
            raise ValueError(f"no audio for frames {job.start_seq}..{job.end_seq} of session {job.session}")
        result = await self._batcher.submit((audio, job.language))
        asr_ms = (time.perf_counter() - t0) * 1000
        if watch.cancelled:
            return
        self.ctx.publisher.publish_nowait(Keys.events(job.session), Transcript(
            session=job.session, turn=job.turn, text=result.text, final=job.final,
            start_seq=job.start_seq, end_seq=job.end_seq, asr_ms=asr_ms,
        ))
        if job.final:
            self.ctx.mark(job, "done", asr_ms)
