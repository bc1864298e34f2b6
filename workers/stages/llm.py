"""LLM stage: build the turn's context from Redis and stream tokens as they decode.

Every delta goes to the session's token stream at once (no waiting for
sentences; only a possible sentence end waits for the next character), within
the pool's spoken-reply budget (`workers.llm.budget`: past `soft_tokens` the
reply ends at the next sentence end), with explicit (turn, seq) ids: a job re-run after a worker died
regenerates the same deterministic tokens, and Redis refuses the ones that
already landed, so the caller never sees a token twice.
"""

from __future__ import annotations

import logging
import time
import uuid

from shared import metrics
from shared.bus.entries import count_rejected
from shared.cancel import CancelWatch
from shared.protocol import (
    ChatMessage,
    Keys,
    LlmJob,
    ProtocolError,
    RejectReason,
    TokenChunk,
    decode_as,
    output_entry_id,
)
from workers import llm as llm_engines
from workers.llm.budget import SpokenReply
from workers.stages.base import StageContext, StageHandler

log = logging.getLogger("voxbus.stage.llm")


class LlmStage(StageHandler):
    def __init__(self, ctx: StageContext, engine: llm_engines.LlmEngine | None = None) -> None:
        super().__init__(ctx)
        self.engine = engine or llm_engines.create(ctx.pool.engine, dict(ctx.pool.options))

    async def load(self) -> None:
        await self.engine.load()

    async def aclose(self) -> None:
        await self.engine.aclose()

    async def context(self, session: str) -> list[ChatMessage]:
        messages: list[ChatMessage] = []
        for raw in await self.ctx.redis.lrange(Keys.ctx(session), 0, -1):
            try:
                msg = decode_as(raw, ChatMessage)
            except ProtocolError as exc:
                count_rejected("ctx", exc.reason)
                log.warning("skipping malformed context entry of %s: %s", session, exc)
                continue
            if msg.session != session:  # a foreign entry must never reach this caller's prompt
                count_rejected("ctx", RejectReason.WRONG_SESSION)
                continue
            messages.append(msg)
        return messages

    async def run(self, job: LlmJob, watch: CancelWatch) -> None:
        t0 = time.perf_counter()
        messages = await self.context(job.session)
        if not any(m.role == "user" for m in messages):
            raise ValueError(f"session {job.session} has no user message in its context")
        key = Keys.tokens(job.session)
        pub = self.ctx.publisher
        seq = 0
        first_at = t0
        reply = SpokenReply(self.ctx.pool.reply)
        stream = self.engine.stream(
            messages, request_id=f"{job.session}-{job.turn}-{uuid.uuid4().hex[:8]}",
            max_tokens=min(job.max_tokens, self.ctx.pool.reply.max_tokens), watch=watch,
        )

        def publish(text: str) -> None:
            nonlocal seq
            pub.publish_nowait(key, TokenChunk(session=job.session, turn=job.turn, seq=seq, text=text),
                               entry_id=output_entry_id(job.turn, seq))
            seq += 1

        try:
            async for delta in stream:
                if watch.cancelled:
                    break
                if not delta:
                    continue
                if reply.tokens == 0:
                    first_at = time.perf_counter()
                    self.ctx.mark(job, "ttft", (first_at - t0) * 1000)
                text, stop = reply.push(delta)
                if text:
                    publish(text)
                if stop:  # closing the stream below aborts the generation
                    self.ctx.mark(job, f"cut_{reply.stopped}", float(reply.tokens))
                    break
        finally:
            await stream.aclose()
        if watch.cancelled:
            return
        if not reply.stopped and (rest := reply.finish()):
            publish(rest)
        pub.publish_nowait(key, TokenChunk(session=job.session, turn=job.turn, seq=seq, text="", final=True),
                           entry_id=output_entry_id(job.turn, seq))
        end = time.perf_counter()
        self.ctx.mark(job, "done", (end - t0) * 1000)
        if reply.tokens > 1 and end > first_at:
            pool = self.ctx.pool
            metrics.LLM_TOKENS_PER_S.labels(pool.name, pool.stage, pool.gpu_type).observe((reply.tokens - 1) / (end - first_at))
