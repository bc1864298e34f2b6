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

from shared.cancel import CancelWatch
from shared.protocol import AsrJob, Keys, Transcript
from workers import asr as asr_engines
from workers.stages.base import StageContext, StageHandler
from workers.stages.frames import read_frames

log = logging.getLogger("voxbus.stage.asr")


class AsrStage(StageHandler):
    def __init__(self, ctx: StageContext, engine: asr_engines.AsrEngine | None = None) -> None:
        super().__init__(ctx)
        self.engine = engine or asr_engines.create(ctx.pool.engine, dict(ctx.pool.options))
        self._batch: list[tuple[np.ndarray, str | None, asyncio.Future[asr_engines.AsrResult]]] = []
        self._batch_task: asyncio.Task[None] | None = None

    async def load(self) -> None:
        await asyncio.to_thread(self.engine.load)

    async def aclose(self) -> None:
        if self._batch_task:
            await asyncio.gather(self._batch_task, return_exceptions=True)

    async def read_audio(self, job: AsrJob) -> np.ndarray:
        """The job's frames as float32 samples; missing frames (trimmed, lost) become silence."""
        return await read_frames(self.ctx.redis, job.session, job.start_seq, job.end_seq, turn=job.turn)

    async def _transcribe(self, audio: np.ndarray, language: str | None) -> asr_engines.AsrResult:
        fut: asyncio.Future[asr_engines.AsrResult] = asyncio.get_running_loop().create_future()
        self._batch.append((audio, language, fut))
        if self._batch_task is None or self._batch_task.done():
            self._batch_task = asyncio.create_task(self._run_batches())
        return await fut

    async def _run_batches(self) -> None:
        await asyncio.sleep(0)  # let jobs that started in the same tick join the batch
        while self._batch:
            batch, self._batch = self._batch, []
            language = batch[0][1]
            try:
                if len(batch) == 1:
                    results = [await asyncio.to_thread(self.engine.transcribe, batch[0][0], language)]
                else:
                    results = await asyncio.to_thread(self.engine.transcribe_batch, [a for a, _, _ in batch], language)
            except Exception as exc:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, _, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    async def run(self, job: AsrJob, watch: CancelWatch) -> None:
        t0 = time.perf_counter()
        audio = await self.read_audio(job)
        if audio.size == 0:
            raise ValueError(f"no audio for frames {job.start_seq}..{job.end_seq} of session {job.session}")
        result = await self._transcribe(audio, job.language)
        asr_ms = (time.perf_counter() - t0) * 1000
        if watch.cancelled:
            return
        self.ctx.publisher.publish_nowait(Keys.events(job.session), Transcript(
            session=job.session, turn=job.turn, text=result.text, final=job.final,
            start_seq=job.start_seq, end_seq=job.end_seq, asr_ms=asr_ms,
        ))
        if job.final:
            self.ctx.mark(job, "done", asr_ms)
