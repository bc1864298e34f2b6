"""LLM stage: build the turn's context from Redis and stream tokens as they decode.

Every delta goes to the session's token stream at once (no waiting for
sentences; only a possible sentence end waits for the next character), within
the pool's spoken-reply budget (`workers.llm.budget`: past `soft_tokens` the
reply ends at the next sentence end), with explicit (turn, seq) ids.

A job re-run after its worker died finds the chunks the first run published
and never splices a second, different reply onto them: an engine that can
continue a reply (vLLM: `supports_prefix`) goes on after that text; a
deterministic one (llama.cpp on one sequence) decodes the same tokens again
and Redis refuses the ones that already landed; any other (an
OpenAI-compatible server that batches) ends the reply where the first run left it.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import cast

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
    decode_entry,
    output_entry_id,
    turn_range,
)
from shared.redis_conn import xrange
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
        warm = getattr(self.engine, "warm", None)
        if warm is not None and self.ctx.pool.warm_prompt:
            await warm(self.ctx.pool.warm_prompt)

    async def aclose(self) -> None:
        await self.engine.aclose()

    async def context(self, session: str) -> list[ChatMessage]:
        messages: list[ChatMessage] = []
        for raw in cast(list[bytes], await self.ctx.redis.lrange(Keys.ctx(session), 0, -1)):
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

    async def spoken(self, job: LlmJob) -> list[TokenChunk]:
        """The reply's chunks already in the tokens stream (an earlier run of this job published them)."""
        chunks: list[TokenChunk] = []
        for _, fields in await xrange(self.ctx.redis, Keys.tokens(job.session), *turn_range(job.turn)):
            try:
                msg = decode_entry(fields)
            except ProtocolError:
                continue
            if isinstance(msg, TokenChunk) and msg.session == job.session and msg.turn == job.turn:
                chunks.append(msg)
        return chunks

    async def resume(self, job: LlmJob, reply: SpokenReply) -> tuple[str, int] | None:
        """Where this run starts: (text already spoken to continue after, next seq); ("", 0) for a
        first run; None when there is nothing left to do. A re-run (the first run's worker died)
        never splices a second, different reply onto what the caller may have heard."""
        spoken = await self.spoken(job)
        if not spoken:
            return "", 0
        if spoken[-1].final:
            return None  # the reply was complete; only the ack was lost
        text, seq = "".join(c.text for c in spoken), len(spoken)
        spent = SpokenReply(self.ctx.pool.reply).resume(text, seq)
        if getattr(self.engine, "supports_prefix", False) and not spent:
            reply.resume(text, seq)
            return text, seq
        if getattr(self.engine, "deterministic", False) and not spent:
            return "", 0  # it decodes the same tokens again: Redis refuses the copies
        # An engine that can neither continue a reply nor repeat it token for token: the reply
        # ends where the first run left it.
        self.ctx.publisher.publish_nowait(Keys.tokens(job.session), TokenChunk(
            session=job.session, turn=job.turn, seq=seq, text="", final=True), entry_id=output_entry_id(job.turn, seq))
        self.ctx.mark(job, "cut_rerun", float(seq))
        return None

    async def run(self, job: LlmJob, watch: CancelWatch) -> None:
        t0 = time.perf_counter()
        messages = await self.context(job.session)
        if not any(m.role == "user" for m in messages):
            raise ValueError(f"session {job.session} has no user message in its context")
        key = Keys.tokens(job.session)
        pub = self.ctx.publisher
        first_at = t0
        reply = SpokenReply(self.ctx.pool.reply)
        resumed = await self.resume(job, reply)
        if resumed is None:
            return
        prefix, seq = resumed
        options = {"prefix": prefix} if prefix else {}
        stream = self.engine.stream(
            messages, request_id=f"{job.session}-{job.turn}-{uuid.uuid4().hex[:8]}",
            max_tokens=min(job.max_tokens, self.ctx.pool.reply.max_tokens), watch=watch, **options,
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
        if reply.tokens:  # first token to the end of the reply, on the wall clock the spans use
            now = time.time()
            self.ctx.span(job, "generation", now - (end - first_at), now)
        if reply.tokens > 1 and end > first_at:
            pool = self.ctx.pool
            metrics.LLM_TOKENS_PER_S.labels(pool.name, pool.stage, pool.gpu_type).observe((reply.tokens - 1) / (end - first_at))
