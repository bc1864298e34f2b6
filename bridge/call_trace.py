"""The bridge's half of a call's trace (see `shared.tracing`): a `session` span for the call, a
`turn` span per turn, and under it a span per job the bridge queued (`asr`, `eot`, `llm`,
`tts`: from enqueue until the worker's `JobRun` says it ended), `endpointing` (end of speech
to the decision) and `playout` (first agent frame to the end of the turn).

Each job's span travels in the job as its traceparent, so the worker's spans join under it.
Every method is a no-op when tracing is off.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from shared import tracing
from shared.protocol import JobRun

from .waterfall import TurnTimes

if TYPE_CHECKING:
    from opentelemetry.trace import Span

# Turns kept open at most: a turn that never reached its reply (merged, abandoned), or a job
# whose worker never reported (it died), is ended when it falls this far behind, so an
# hour-long call holds a bounded number of spans.
MAX_OPEN_TURNS = 8


class CallTrace:
    def __init__(self, sid: str, transport: str, started: float | None = None) -> None:
        self.sid = sid
        self._session: Span | None = tracing.start_span(
            "session", None, started or time.time(), {"voxbus.session": sid, "voxbus.transport": transport})
        self._turns: dict[int, Span] = {}
        self._jobs: dict[tuple[int, str], list[Span]] = {}

    @property
    def on(self) -> bool:
        return self._session is not None

    def job(self, stage: str, turn: int, pool: str, turn_start: float | None = None) -> str:
        """Open the span of a job being queued; its traceparent, for the job message ("" when off)."""
        if self._session is None:
            return ""
        parent = self._turn(turn, turn_start or time.time())
        span = tracing.start_span(stage, parent, time.time(), {"voxbus.turn": turn, "voxbus.pool": pool})
        if span is None:
            return ""
        self._jobs.setdefault((turn, stage), []).append(span)
        return tracing.traceparent(span)

    def job_ended(self, run: JobRun) -> None:
        """A worker's report on a job: end the bridge's span of it (retries stay open until the last)."""
        spans = self._jobs.get((run.turn, run.stage))
        if not spans or run.outcome == "retried":
            return
        span = next((s for s in spans if tracing.traceparent(s) == run.trace), spans[0])
        spans.remove(span)
        if not spans:
            del self._jobs[(run.turn, run.stage)]
        span.set_attributes({"voxbus.outcome": run.outcome.value, "voxbus.worker": run.worker,
                             "voxbus.gpu_type": run.gpu_type, "voxbus.pool": run.pool,
                             "voxbus.queue_wait_ms": round((run.started - run.queued) * 1000, 1)})
        span.end(end_time=tracing.ns(max(run.ended, run.queued)))

    def turn_over(self, turn: int, t: TurnTimes | None) -> None:
        """The agent finished (or was cut on) `turn`: endpointing and playout spans, then end it."""
        span = self._turns.pop(turn, None)
        if span is None:
            return
        now = time.time()
        if t is not None:
            if t.speech_end_ts and t.endpoint_ts:
                tracing.span_between("endpointing", span, t.speech_end_ts, t.endpoint_ts,
                                     {"voxbus.endpoint_by": t.endpoint_by, "voxbus.turn": turn})
            if t.first_audio_ts:
                tracing.span_between("playout", span, t.first_audio_ts, now,
                                     {"voxbus.interrupted": t.interrupted, "voxbus.turn": turn})
            attrs: dict[str, Any] = {"voxbus.interrupted": t.interrupted}
            if t.response_ms is not None:
                attrs["voxbus.response_ms"] = round(t.response_ms, 1)
            if tracing.include_text():
                attrs.update({"voxbus.user_text": t.user_text, "voxbus.agent_text": t.agent_text,
                              "voxbus.heard_text": t.heard_text})
            span.set_attributes(attrs)
        # Its job spans stay open until their workers report (a cancelled TTS job reports after the flush).
        span.end(end_time=tracing.ns(now))

    def close(self) -> None:
        """The call ended: end every span still open, the session's last."""
        if self._session is None:
            return
        now = time.time()
        self._end_jobs(lambda k: True, now)
        for span in self._turns.values():
            span.end(end_time=tracing.ns(now))
        self._turns.clear()
        self._session.end(end_time=tracing.ns(now))
        self._session = None

    def _turn(self, turn: int, start: float) -> Span | None:
        span = self._turns.get(turn)
        if span is None:
            span = tracing.start_span("turn", self._session, start, {"voxbus.turn": turn, "voxbus.session": self.sid})
            if span is None:
                return None
            self._turns[turn] = span
            for old in sorted(self._turns)[:-MAX_OPEN_TURNS]:
                self.turn_over(old, None)
            self._end_jobs(lambda k: k[0] < turn - MAX_OPEN_TURNS, start)
        return span

    def _end_jobs(self, which: Any, now: float) -> None:
        for key in [k for k in self._jobs if which(k)]:
            for span in self._jobs.pop(key):
                span.set_attribute("voxbus.outcome", "unfinished")
                span.end(end_time=tracing.ns(now))
