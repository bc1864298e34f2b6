"""TTS stage: follow the turn's token stream and speak it piece by piece.

Speech starts after the reply's first few words (the pool's `chunks`
settings, workers/tts/clauses.py), then goes on clause by clause. Each
piece's audio is shaped so that consecutive pieces join without a gap or a
click (workers/tts/seams.py); both engines go through here. Audio goes to the
session's audio.out stream in chunks of at most `CHUNK_MS` with explicit
(turn, seq) ids; a cancel stops synthesis between chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np

from shared import metrics, opus
from shared.bus.entries import count_rejected
from shared.cancel import CancelWatch
from shared.protocol import (
    Keys,
    ProtocolError,
    RejectReason,
    TokenChunk,
    TtsJob,
    decode_entry,
    output_entry_id,
    turn_start_exclusive,
)
from shared.redis_conn import StreamEntry, xread
from workers import tts as tts_engines
from workers.stages.base import StageContext, StageHandler
from workers.tts.audio_out import AgentAudioWriter
from workers.tts.clauses import ClauseBuffer
from workers.tts.seams import PieceShaper

log = logging.getLogger("voxbus.stage.tts")

CHUNK_MS = 200
TOKEN_WAIT_S = 30.0  # an LLM job being retried after a crash may take a while
_POLL_MS = 50
_END = object()


class TtsStage(StageHandler):
    def __init__(self, ctx: StageContext, engine: tts_engines.TtsEngine | None = None) -> None:
        super().__init__(ctx)
        self.engine = engine or tts_engines.create(ctx.pool.engine, dict(ctx.pool.options))

    async def load(self) -> None:
        await asyncio.to_thread(self.engine.load)
        if self.ctx.pool.audio_codec == "opus":
            await asyncio.to_thread(opus.warm_up, self.engine.sample_rate)

    async def tokens(self, job: TtsJob, watch: CancelWatch) -> AsyncIterator[str]:
        """The turn's token texts as they arrive, until the final chunk (or cancel)."""
        key = Keys.tokens(job.session)
        last: bytes | str = turn_start_exclusive(job.turn)
        waited = 0.0
        expect = 0
        while not watch.cancelled:
            reply = await xread(self.ctx.redis, {key: last}, count=256, block_ms=_POLL_MS)
            if not reply:
                waited += _POLL_MS / 1000
                if waited > TOKEN_WAIT_S:
                    raise TimeoutError(f"no tokens for turn {job.turn} of {job.session} in {TOKEN_WAIT_S:.0f}s")
                continue
            waited = 0.0
            if expect == 0:
                first_ts = _first_token_ts(reply[0][1])
                if first_ts is not None:  # how long the first token took to reach this worker
                    hop_ms = max(0.0, (time.time() - first_ts) * 1000)
                    self.ctx.mark(job, "token_hop", hop_ms)
                    metrics.BUS_HOP_MS.labels("tokens").observe(hop_ms)
            for entry_id, fields in reply[0][1]:
                last = entry_id
                try:
                    chunk = decode_entry(fields)
                except ProtocolError as exc:
                    count_rejected("tokens", exc.reason)
                    continue
                if not isinstance(chunk, TokenChunk) or chunk.session != job.session:
                    count_rejected("tokens", RejectReason.WRONG_TYPE if not isinstance(chunk, TokenChunk)
                                   else RejectReason.WRONG_SESSION)
                    continue  # never speak what does not belong to this turn
                if chunk.turn != job.turn:
                    return  # a later turn began: this one is over
                if chunk.seq < expect:
                    continue  # duplicate
                expect = chunk.seq + 1
                if chunk.text:
                    yield chunk.text
                if chunk.final:
                    return

    async def clauses(self, job: TtsJob, watch: CancelWatch) -> AsyncIterator[str]:
        c = self.ctx.pool.chunks
        buf = ClauseBuffer(c.first_words, c.min_words)
        if job.text is not None:
            for clause in buf.push(job.text):
                yield clause
        else:
            async for text in self.tokens(job, watch):
                for clause in buf.push(text):
                    yield clause
        rest = buf.flush()
        if rest:
            yield rest

    async def run(self, job: TtsJob, watch: CancelWatch) -> None:
        t0 = time.perf_counter()
        key = Keys.audio_out(job.session)
        pub = self.ctx.publisher
        rate = self.engine.sample_rate
        max_samples = rate * CHUNK_MS // 1000
        c = self.ctx.pool.chunks
        shaper = PieceShaper(rate, edge_ms=c.edge_ms, fade_ms=c.fade_ms, clause_pause_ms=c.clause_pause_ms,
                             sentence_pause_ms=c.sentence_pause_ms)
        seq = 0
        label = ""
        clause_at = t0

        out = AgentAudioWriter(job, rate, opus=self.ctx.pool.audio_codec == "opus")

        def send(pcm: np.ndarray) -> None:
            nonlocal seq, label
            for start in range(0, len(pcm), max_samples):
                if watch.cancelled:
                    return
                if seq == 0:  # synthesis time of the first clause, and how long the clause took to arrive
                    self.ctx.mark(job, "first_audio", (time.perf_counter() - clause_at) * 1000)
                    self.ctx.mark(job, "first_clause", (clause_at - t0) * 1000)
                msg = out.chunk(seq, pcm[start:start + max_samples], label)
                if msg is None:
                    continue  # under one Opus packet so far: it goes out with the next samples
                pub.publish_nowait(key, msg, entry_id=output_entry_id(job.turn, seq))
                label = ""
                seq += 1

        previous: str | None = None
        async for clause in self.clauses(job, watch):
            clause_at = time.perf_counter()
            label = clause
            send(shaper.begin(previous))  # the pause the text calls for, queued while this piece is synthesized
            previous = clause
            gen: Iterator[np.ndarray] = self.engine.synthesize(clause, job.voice)
            while not watch.cancelled:
                audio = await asyncio.to_thread(next, gen, _END)
                if audio is _END:
                    send(shaper.end())
                    break
                send(shaper.push(np.asarray(audio, dtype=np.int16)))
            close = getattr(gen, "close", None)
            if close is not None:
                close()
            if watch.cancelled:
                break
        if watch.cancelled:
            return
        pub.publish_nowait(key, out.final(seq, label), entry_id=output_entry_id(job.turn, seq))


def _first_token_ts(entries: list[StreamEntry]) -> float | None:
    for _, fields in entries:
        try:
            chunk = decode_entry(fields)
        except ProtocolError:
            continue
        if isinstance(chunk, TokenChunk):
            return chunk.ts
    return None
