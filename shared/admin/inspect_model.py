"""`voxbus inspect`, the model's types: what a report shows, in seconds from the call's origin.

`inspect_timeline.build` makes a `Timeline` from a recording; `inspect_waterfall`
adds each turn's latency waterfall and the session totals; `inspect_rows` and
`inspect_html` draw it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import FRAME_MS

FRAME_S = FRAME_MS / 1000
PAD_S = 0.3  # air around a row's first and last event
MAX_LOOKBACK_S = 15.0  # a row without a transcript starts at most this long before its first event
STAGES = ("eot", "asr", "llm", "tts")
Rel = Callable[[float], float]  # a wall-clock time to seconds from the origin

# Every marker kind, in legend order, with what it means (the report's legend).
MARKER_KINDS: dict[str, str] = {
    "preemptive-start": "a preemptive turn started at a pause (ASR, LLM and TTS run before the end is certain)",
    "preemptive-abandon": "the preemptive turn was abandoned: the caller went on",
    "preemptive-confirm": "the preemptive turn was confirmed by the end of the turn",
    "endpoint": "the end of the turn was decided (by the end-of-turn model or the VAD's silence timeout)",
    "merged": "the caller went on before hearing the reply: this turn joined the next",
    "barge-in": "the caller talked over the agent (placed where playout was cut)",
    "cut": "playout flushed: the caller heard the agent up to here",
    "false-interruption": "speech over the agent without a transcript: playout resumed",
    "cancel": "a worker stopped, or skipped, a job of a cancelled turn",
    "overflow": "a job went to a fallback pool",
    "retry": "a job delivered again (after a failure or a dead worker)",
    "failure": "a job failed and was left for another try",
    "dead-letter": "a job failed its last try and was dead-lettered",
    "late": "a job was dropped: picked up past its deadline (overload)",
    "busy": "the caller was told the agent is busy",
}


@dataclass(frozen=True, slots=True)
class Span:
    t0: float
    t1: float
    label: str = ""
    title: str = ""


@dataclass(frozen=True, slots=True)
class Point:
    t: float
    label: str = ""
    title: str = ""
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Marker:
    kind: str  # a key of MARKER_KINDS
    t: float
    turn: int
    title: str


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery of one job (a `JobRun`), times relative to the origin."""

    turn: int
    stage: str
    pool: str
    gpu_type: str
    worker: str
    entry_id: str
    queued: float
    started: float
    ended: float
    outcome: str
    deliveries: int
    reason: str

    @property
    def key(self) -> str:
        """Unique per delivery: entry ids repeat across pools, and a retry repeats its own."""
        return f"{self.pool}/{self.entry_id}/{self.deliveries}"

    @property
    def wait_ms(self) -> float:
        return max(0.0, (self.started - self.queued) * 1000)

    @property
    def run_ms(self) -> float:
        return max(0.0, (self.ended - self.started) * 1000)


@dataclass(frozen=True, slots=True)
class Playout:
    """A turn's agent audio as the caller heard it: from `start`, `heard_ms` of it (None: not known yet)."""

    turn: int
    start: float
    heard_ms: float | None = None
    end: float | None = None  # when the last frame went out
    flushed: bool = False  # a barge-in cut it after `heard_ms`


@dataclass(slots=True)
class TurnRow:
    turn: int  # the turn that answered (the chain's last)
    turns: list[int]
    t0: float = 0.0
    t1: float = 0.0
    status: str = ""
    user_text: str = ""
    agent_text: str = ""
    heard_text: str | None = None
    eot: list[Point] = field(default_factory=list)
    asr: list[Point] = field(default_factory=list)
    tokens: list[Point] = field(default_factory=list)
    tts: list[Span] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    waterfall: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Timeline:
    session: str
    origin: float  # wall clock of t = 0 (caller frame 0)
    duration: float
    transport: str = ""
    speech: list[Span] = field(default_factory=list)  # VAD voiced segments
    pauses: list[Span] = field(default_factory=list)  # silences inside an utterance, and the one that ended it
    rows: list[TurnRow] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    playouts: dict[int, Playout] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # caveats shown under the session's header

    @property
    def markers(self) -> list[Marker]:
        return [m for row in self.rows for m in row.markers]
