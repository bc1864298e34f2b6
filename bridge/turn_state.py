"""The turn machine's state: its configuration, what it remembers of turns, and the helpers every rule uses.

`bridge.turns.TurnMachine` is built on this (its end-of-turn rules) and on
`bridge.turn_replies` (replies, playout, barge-in, failures); see bridge/turns.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .turn_events import (
    CancelTurn,
    Command,
    Phase,
    Playout,
    Record,
    RemoveUserText,
    SetPhase,
    TokenIn,
)

if TYPE_CHECKING:
    from shared.config import BridgeConfig


@dataclass(frozen=True, slots=True)
class TurnConfig:
    barge_in_min_speech_ms: float = 200.0
    false_interrupt_timeout_ms: float = 1500.0
    # "none": the VAD's silence timeout ends a turn. Anything else names an end-of-turn model that
    # scores each pause: a probability >= eot_fast_threshold ends the turn at once, one >=
    # eot_threshold once min_endpoint_ms of silence has passed; otherwise the VAD's (longer)
    # timeout does.
    eot: str = "none"
    eot_threshold: float = 0.5
    min_endpoint_ms: float = 0.0
    eot_fast_threshold: float = 1.0  # 1.0: no fast path (every "complete" waits min_endpoint_ms)
    # A language of bridge.turn_text (e.g. "en"): the model's "complete" also needs the preemptive
    # transcript, with no continuation cue at its end ("My name is", "a table for", "um"); a cue
    # leaves the end to the VAD's timeout. "": the model alone.
    eot_language: str = ""
    eot_extra_cues: tuple[str, ...] = ()  # more cue words or phrases, added to the language's
    eot_unpunctuated: bool = False  # a transcript with no final . ? ! is a cue too (an ASR that punctuates)
    # Any "complete" also waits this many ms of silence per second the turn has lasted so far: a caller
    # who has held the floor for a while (a story, a list, a reading) gets longer to go on.
    min_endpoint_per_s: float = 0.0
    # While the caller stays silent after an "incomplete" verdict, ask again this often (the model
    # hears the growing silence): 0 asks once per pause.
    rescore_ms: float = 200.0
    pause_ms: float = 100.0  # the silence at which a VadPause arrives
    max_merge_ms: float = 30_000.0  # a continuation joins the turn before it only within this span
    busy_message: str = ""  # said when a job of a turn was dropped for lateness ("" : only a control message)
    # No agent audio this long after the end of a turn (a pool without a live worker, a lost job):
    # the caller is told, as for a late job, instead of waiting in silence.
    reply_timeout_ms: float = 15_000.0
    frame_ms: float = 20.0

    @classmethod
    def from_bridge(cls, b: BridgeConfig) -> TurnConfig:
        """The turn machine's settings from the pools file's [bridge] table."""
        return cls(
            barge_in_min_speech_ms=b.barge_in_min_speech_ms, false_interrupt_timeout_ms=b.false_interrupt_timeout_ms,
            eot=b.eot, eot_threshold=b.eot_threshold, min_endpoint_ms=b.min_endpoint_ms,
            eot_fast_threshold=b.eot_fast_threshold, eot_language="" if b.eot_language == "none" else b.eot_language,
            eot_extra_cues=tuple(b.eot_extra_cues), eot_unpunctuated=b.eot_unpunctuated,
            min_endpoint_per_s=b.min_endpoint_per_s, rescore_ms=b.eot_rescore_ms, pause_ms=b.preemptive_pause_ms,
            busy_message=b.busy_message, reply_timeout_ms=b.reply_timeout_ms,
        )


@dataclass
class Spec:
    """A turn started at a pause, not yet confirmed by the end of the turn."""

    turn: int
    start_frame: int
    end_frame: int
    paused_at: float
    transcript: str | None = None
    generating: bool = False
    held_tokens: list[TokenIn] = field(default_factory=list)
    prob: float | None = None  # the end-of-turn model's latest verdict
    cue: str | None = None  # the continuation cue its transcript ends on (see bridge.turn_text)
    scoring: bool = False  # a ScoreTurn is out
    scored_at: float = 0.0  # when the latest ScoreTurn went out


@dataclass
class TurnRecord:
    """What the machine knows of a user turn whose end was decided."""

    turn: int
    start_frame: int
    end_frame: int
    text: str | None = None  # final transcript (None: not yet)
    replying: bool = False  # its LLM/TTS jobs were queued
    agent_text: list[str] = field(default_factory=list)
    token_seq: int = 0
    heard: bool = False  # a frame of its reply reached the caller
    interrupted: bool = False  # cut by a barge-in: the context holds what was heard
    done: bool = False  # no more reply to come: played out, failed, empty, merged or superseded
    apology: bool = False  # a turn of the agent's own (the busy message), not an answer
    ended_at: float = 0.0  # when the end of the turn was decided


class TurnState:
    """Fields and shared helpers of the turn machine (no rule lives here)."""


    def __init__(self, config: TurnConfig | None = None) -> None:
        self.cfg = config or TurnConfig()
        self.phase = Phase.LISTENING
        self.turn = -1  # the latest turn id handed out
        self.agent_turn = -1  # the turn whose reply is being produced or played
        self.turns: dict[int, TurnRecord] = {}
        self._spec: Spec | None = None
        self._speech_since: float | None = None  # the caller has been speaking since (VAD), else None
        self._merge_from: int | None = None  # start frame of the turn a continuation joins
        self._ended_through = -1  # last frame of the newest ended turn
        self._pending_barge: tuple[int, float] | None = None  # (turn, deadline) of a soft VAD barge-in
        self._paused = False  # playout paused by a soft barge-in
        self._cancelled = -1  # the work of turns up to this one was cancelled
        self._flushed = -1  # playout of turns up to this one was dropped
        self._queued: set[int] = set()  # turns with agent audio queued and not all played

    @property
    def speculating(self) -> int | None:
        return self._spec.turn if self._spec else None

    def _audible(self, heard_only: bool = False) -> bool:
        """Agent audio is playing or queued to play (held speculative audio does not count)."""
        spec = self._spec.turn if self._spec else None
        for turn in self._queued:
            if turn <= self._flushed or turn == spec:
                continue
            rec = self.turns.get(turn)
            if not heard_only or (rec is not None and rec.heard):
                return True
        return False

    # ------------------------------------------------------------- VAD

    def _cancel(self, turn: int, reason: str, out: list[Command]) -> None:
        self._cancelled = max(self._cancelled, turn)
        out.append(CancelTurn(turn, reason))

    # ------------------------------------------------------------- ASR, LLM and TTS results

    def _abandon(self, spec: Spec, why: str, out: list[Command]) -> None:
        self._spec = None
        out.append(Playout("release", -1))
        out.append(Playout("flush", spec.turn))
        self._flushed = max(self._flushed, spec.turn)
        self._cancel(spec.turn, f"speculation: {why}", out)
        if spec.generating:
            out.append(RemoveUserText(spec.turn))
        if self.agent_turn == spec.turn:
            self.agent_turn = -1
        out.append(Record("preemptive", spec.turn, {"outcome": "abandoned", "why": why}))

    def _set_phase(self, phase: Phase, turn: int, out: list[Command]) -> None:
        if phase != self.phase:
            self.phase = phase
            out.append(SetPhase(phase, turn))
