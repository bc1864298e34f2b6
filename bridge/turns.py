"""The turn machine: every turn-taking decision of one call, as a pure function of events.

`TurnMachine.handle(event)` takes one event (VAD start / pause / resume / end,
an end-of-turn verdict, a transcript, a token, agent audio queued or played,
a client interrupt, a failed job, a timer tick) and returns the commands that
follow from it (submit a job, cancel a turn, hold / release / flush / pause /
resume playout, send tokens or a control message, append to or remove from
the context, publish an event, count a metric). It reads no clock (every
event carries the time), touches no Redis and no asyncio: `CallSession`
applies the commands. Every rule below is a unit test in
tests/bridge/test_turns.py.

Turns. A user turn gets an id when its work starts: at a pause in the
caller's speech (a *speculative* turn: ASR, LLM and TTS start at once, its
tokens and audio are held) or at the end of the turn. The end of a turn is:
- with `eot="none"`, the VAD's end of speech (its silence timeout);
- with an end-of-turn model, a "complete" verdict on the utterance so far,
  given at a pause (after `min_endpoint_ms` of silence), or else the VAD's end
  of speech after `max_endpoint_ms`.
A speculative turn whose range the end confirms is released at once;
otherwise it is abandoned (cancelled, its context entry removed).

The caller going on. After the end of a turn:
- if no agent audio of it has been heard yet, the reply is cancelled and the
  continuation joins the same user turn: the next ASR runs over the whole
  frame range (from the first utterance's start), so there is one transcript
  and no reply to the fragment;
- once agent audio was heard, talking over it is a barge-in: after
  `barge_in_min_speech_ms` of speech playout pauses and the generation is
  cancelled; a non-empty transcript of the new speech confirms it (flush,
  what was heard goes into the context), none within
  `false_interrupt_timeout_ms` resumes playout (a false interruption). A
  client `interrupt` is a hard barge-in: flushed and cancelled at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .turn_events import (
    AppendAgentText,
    AudioQueued,
    CancelTurn,
    ClientInterrupt,
    Command,
    CommitHeard,
    Control,
    EotVerdict,
    Event,
    FramePlayed,
    JobBusy,
    JobCancelledIn,
    JobFailedIn,
    Phase,
    Playout,
    Record,
    RemoveUserText,
    Say,
    ScoreTurn,
    SendTokens,
    SetPhase,
    StartReply,
    SubmitAsr,
    Tick,
    TokenIn,
    TranscriptIn,
    VadEnd,
    VadPause,
    VadResume,
    VadStart,
)

# ------------------------------------------------------------------ configuration and state


@dataclass(frozen=True, slots=True)
class TurnConfig:
    barge_in_min_speech_ms: float = 200.0
    false_interrupt_timeout_ms: float = 1500.0
    # "none": the VAD's silence timeout ends a turn. Anything else names an end-of-turn model that
    # scores each pause: a probability >= eot_threshold ends the turn once min_endpoint_ms of
    # silence has passed; otherwise the VAD's (longer) timeout does.
    eot: str = "none"
    eot_threshold: float = 0.5
    min_endpoint_ms: float = 0.0
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


@dataclass
class _Spec:
    """A turn started at a pause, not yet confirmed by the end of the turn."""

    turn: int
    start_frame: int
    end_frame: int
    paused_at: float
    transcript: str | None = None
    generating: bool = False
    held_tokens: list[TokenIn] = field(default_factory=list)
    prob: float | None = None  # the end-of-turn model's latest verdict
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


class TurnMachine:
    def __init__(self, config: TurnConfig | None = None) -> None:
        self.cfg = config or TurnConfig()
        self.phase = Phase.LISTENING
        self.turn = -1  # the latest turn id handed out
        self.agent_turn = -1  # the turn whose reply is being produced or played
        self.turns: dict[int, TurnRecord] = {}
        self._spec: _Spec | None = None
        self._speech_since: float | None = None  # the caller has been speaking since (VAD), else None
        self._merge_from: int | None = None  # start frame of the turn a continuation joins
        self._pending_barge: tuple[int, float] | None = None  # (turn, deadline) of a soft VAD barge-in
        self._paused = False  # playout paused by a soft barge-in
        self._cancelled = -1  # the work of turns up to this one was cancelled
        self._flushed = -1  # playout of turns up to this one was dropped
        self._queued: set[int] = set()  # turns with agent audio queued and not all played

    @property
    def speculating(self) -> int | None:
        return self._spec.turn if self._spec else None

    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        _HANDLERS[type(event)](self, event, out)
        return out

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
    def _on_vad_start(self, ev: VadStart, out: list[Command]) -> None:
        self._speech_since = ev.now
        self._caller_went_on(ev.frame, out)
        if self.phase in (Phase.LISTENING, Phase.THINKING) and self._pending_barge is None:
            self._set_phase(Phase.USER_SPEAKING, self.turn + 1, out)

    def _on_vad_resume(self, ev: VadResume, out: list[Command]) -> None:
        self._speech_since = ev.now
        if self._spec is not None:
            self._abandon(self._spec, "the caller spoke again", out)
        self._caller_went_on(None, out)
        if self.phase in (Phase.LISTENING, Phase.THINKING) and self._pending_barge is None:
            self._set_phase(Phase.USER_SPEAKING, self.turn + 1, out)

    def _caller_went_on(self, frame: int | None, out: list[Command]) -> None:
        """Speech after a turn ended, before any of its reply was heard: the two become one turn."""
        last = self.turns.get(self.turn)
        if last is None or last.heard or last.done or self._spec is not None:
            return
        span_frames = (last.end_frame if frame is None else frame) - last.start_frame
        if span_frames * self.cfg.frame_ms > self.cfg.max_merge_ms:
            return
        self._merge_from = last.start_frame
        last.done = True
        self._cancel(last.turn, "the caller went on", out)
        out.append(Playout("flush", last.turn))
        self._flushed = max(self._flushed, last.turn)
        if last.replying:
            out.append(RemoveUserText(last.turn))
        if self.agent_turn == last.turn:
            self.agent_turn = -1
        out.append(Record("merged", last.turn, {"start_frame": last.start_frame}))

    def _on_vad_pause(self, ev: VadPause, out: list[Command]) -> None:
        self._speech_since = None
        if self._spec is not None:
            self._abandon(self._spec, "a newer pause", out)
        start = self._start_of(ev.start_frame)
        self.turn += 1
        spec = self._spec = _Spec(self.turn, start, ev.end_frame, ev.now)
        out.append(Playout("hold", spec.turn))
        out.append(SubmitAsr(spec.turn, start, ev.end_frame))
        out.append(Record("preemptive", spec.turn, {"outcome": "started"}))
        if self.cfg.eot != "none":
            self._score(spec, ev.now, out)

    def _on_vad_end(self, ev: VadEnd, out: list[Command]) -> None:
        self._speech_since = None
        start = self._start_of(ev.start_frame)
        spec = self._spec
        if spec is not None and (spec.start_frame, spec.end_frame) == (start, ev.end_frame):
            self._end_turn(ev.now, spec.turn, start, ev.end_frame, "vad", ev.silence_ms, out)
            return
        if spec is not None:
            self._abandon(spec, "the utterance went on", out)
        ended = self.turns.get(self.turn)
        if ended is not None and (ended.start_frame, ended.end_frame) == (start, ev.end_frame):
            return  # the model already ended this turn; the VAD's timeout only confirms it
        self.turn += 1
        out.append(SubmitAsr(self.turn, start, ev.end_frame))
        self._end_turn(ev.now, self.turn, start, ev.end_frame, "vad", ev.silence_ms, out)

    def _on_eot(self, ev: EotVerdict, out: list[Command]) -> None:
        complete = ev.prob >= self.cfg.eot_threshold
        out.append(Record("eot", ev.turn, {"prob": round(ev.prob, 4), "complete": complete}))
        spec = self._spec
        if spec is None or spec.turn != ev.turn:
            return  # the caller went on meanwhile, or the VAD ended the turn first
        spec.prob = ev.prob
        spec.scoring = False
        self._end_on_verdict(ev.now, out)

    def _score(self, spec: _Spec, now: float, out: list[Command]) -> None:
        spec.scoring, spec.scored_at = True, now
        out.append(ScoreTurn(spec.turn, spec.start_frame, spec.end_frame))

    def _rescore(self, now: float, out: list[Command]) -> None:
        """The caller is still silent after an "incomplete": ask the model again, with the longer silence."""
        spec = self._spec
        if (spec is None or spec.scoring or spec.prob is None or self.cfg.rescore_ms <= 0
                or spec.prob >= self.cfg.eot_threshold):
            return
        if (now - spec.scored_at) * 1000 + 1e-6 >= self.cfg.rescore_ms:
            self._score(spec, now, out)

    def _end_on_verdict(self, now: float, out: list[Command]) -> None:
        spec = self._spec
        if spec is None or spec.prob is None or spec.prob < self.cfg.eot_threshold:
            return
        silence_ms = (now - spec.paused_at) * 1000 + self.cfg.pause_ms
        if silence_ms + 1e-6 >= self.cfg.min_endpoint_ms:
            self._end_turn(now, spec.turn, spec.start_frame, spec.end_frame, "model", silence_ms, out)

    def _start_of(self, frame: int) -> int:
        return frame if self._merge_from is None else min(frame, self._merge_from)

    # ------------------------------------------------------------- the end of a turn
    def _end_turn(self, now: float, turn: int, start: int, end: int, by: str, silence_ms: float,
                  out: list[Command]) -> None:
        self._merge_from = None
        rec = self.turns[turn] = TurnRecord(turn, start, end, ended_at=now)
        for old in [t for t in self.turns if t < turn - 8]:
            del self.turns[old]
        for old in [t for t in self._queued if t < turn - 8]:
            self._queued.discard(old)
        out.append(Record("turn_end", turn, {"by": by, "silence_ms": round(silence_ms, 1),
                                            "start_frame": start, "end_frame": end}))
        if self.phase in (Phase.USER_SPEAKING, Phase.LISTENING):
            self._set_phase(Phase.THINKING, turn, out)
        spec = self._spec
        if spec is None or spec.turn != turn:
            return
        self._spec = None
        out.append(Playout("release", turn))
        out.append(Record("preemptive", turn, {"outcome": "confirmed"}))
        rec.replying = spec.generating
        if spec.transcript is not None:
            self._final_transcript(rec, spec.transcript, out)
        for token in spec.held_tokens:
            self._on_token(token, out)

    def _abandon(self, spec: _Spec, why: str, out: list[Command]) -> None:
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

    def _cancel(self, turn: int, reason: str, out: list[Command]) -> None:
        self._cancelled = max(self._cancelled, turn)
        out.append(CancelTurn(turn, reason))

    # ------------------------------------------------------------- ASR, LLM and TTS results
    def _on_transcript(self, ev: TranscriptIn, out: list[Command]) -> None:
        if not ev.final:
            out.append(Control({"type": "transcript", "role": "user", "final": False, "text": ev.text, "turn": ev.turn}))
            return
        spec = self._spec
        if spec is not None and spec.turn == ev.turn:
            spec.transcript = ev.text
            if ev.text.strip() and not spec.generating:
                spec.generating = True  # start the reply now; its tokens and audio wait for the end of the turn
                self.agent_turn = ev.turn
                out.append(StartReply(ev.turn, ev.text))
            return
        rec = self.turns.get(ev.turn)
        if rec is None or rec.text is not None:
            return  # an abandoned speculation's transcript, or a duplicate
        self._final_transcript(rec, ev.text, out)

    def _final_transcript(self, rec: TurnRecord, text: str, out: list[Command]) -> None:
        rec.text = text
        out.append(Control({"type": "transcript", "role": "user", "final": True, "text": text, "turn": rec.turn}))
        if rec.done:
            return
        if not text.strip():
            rec.done = True
            if rec.turn == self.turn and self.phase == Phase.THINKING and self._pending_barge is None:
                self._set_phase(Phase.LISTENING, rec.turn, out)
            return
        if self._pending_barge is not None and rec.turn > self._pending_barge[0]:
            self._confirm_barge_in(out)
        if rec.turn < self.turn:
            rec.done = True
            return  # the caller already spoke again; the newer utterance gets the reply
        if rec.replying:
            return  # a confirmed speculative turn: its reply is on its way
        rec.replying = True
        self.agent_turn = rec.turn
        out.append(StartReply(rec.turn, text))
        if self.phase in (Phase.LISTENING, Phase.THINKING):
            self._set_phase(Phase.THINKING, rec.turn, out)

    def _on_token(self, ev: TokenIn, out: list[Command]) -> None:
        if ev.turn != self.agent_turn or ev.turn <= self._cancelled:
            return
        spec = self._spec
        if spec is not None and spec.turn == ev.turn:
            spec.held_tokens.append(ev)  # the caller sees them once the turn is confirmed
            return
        rec = self.turns.get(ev.turn)
        if rec is None or ev.seq < rec.token_seq:
            return  # a duplicate from a re-run job
        rec.token_seq = ev.seq + 1
        rec.agent_text.append(ev.text)
        out.append(SendTokens(ev.turn, ev.seq, ev.text, ev.final))

    def _on_audio_queued(self, ev: AudioQueued, out: list[Command]) -> None:
        if ev.turn > self._flushed:
            self._queued.add(ev.turn)

    def _on_frame_played(self, ev: FramePlayed, out: list[Command]) -> None:
        rec = self.turns.get(ev.turn)
        if ev.last:
            self._queued.discard(ev.turn)
        if rec is None:
            return
        if ev.first:
            rec.heard = True
            self._set_phase(Phase.AGENT_SPEAKING, ev.turn, out)
        if ev.last:
            rec.done = True
            text = "".join(rec.agent_text).strip()
            if text and not rec.interrupted and not rec.apology:
                out.append(AppendAgentText(ev.turn, text))
            if self.phase == Phase.AGENT_SPEAKING and self._pending_barge is None:
                self._set_phase(Phase.LISTENING, ev.turn, out)

    def _on_job_failed(self, ev: JobFailedIn, out: list[Command]) -> None:
        out.append(Control({"type": "error", "turn": ev.turn, "stage": ev.stage, "reason": ev.reason}))
        self._job_lost(ev.turn, out)

    def _on_busy(self, ev: JobBusy, out: list[Command]) -> None:
        """A job of `turn` came too late to its worker: tell the caller, never leave them in silence."""
        out.append(Record("busy", ev.turn, {"stage": ev.stage}))
        if ev.stage == "eot":
            return  # only the end-of-turn verdict is lost: the VAD's timeout ends the turn anyway
        spec = self._spec
        if spec is not None and spec.turn == ev.turn:
            # Work started at a pause came too late: drop it; the end of the turn queues its jobs anew.
            self._abandon(spec, f"its {ev.stage} job was too late", out)
            return
        rec = self.turns.get(ev.turn)
        if rec is None or rec.apology or rec.done or ev.turn <= self._cancelled and not rec.replying:
            return
        out.append(Control({"type": "busy", "turn": ev.turn, "stage": ev.stage, "reason": ev.reason}))
        if ev.turn > self._cancelled:
            self._cancel(ev.turn, f"busy: the {ev.stage} job was too late", out)
        self._job_lost(ev.turn, out)
        if self.cfg.busy_message and self._spec is None and self.phase != Phase.USER_SPEAKING:
            self.turn += 1
            say = self.turns[self.turn] = TurnRecord(self.turn, -1, -1, text="", replying=True, apology=True)
            self.agent_turn = say.turn
            out.append(Say(say.turn, self.cfg.busy_message))
            self._set_phase(Phase.THINKING, say.turn, out)

    def _job_lost(self, turn: int, out: list[Command]) -> None:
        rec = self.turns.get(turn)
        if rec is not None and not rec.heard:
            rec.done = True
        if turn in (self.agent_turn, self.turn) and self.phase in (Phase.THINKING, Phase.AGENT_SPEAKING):
            self._set_phase(Phase.LISTENING, turn, out)

    def _on_job_cancelled(self, ev: JobCancelledIn, out: list[Command]) -> None:
        out.append(Control({"type": "cancelled", "turn": ev.turn, "stage": ev.stage}))

    # ------------------------------------------------------------- barge-in and timers
    def _on_interrupt(self, ev: ClientInterrupt, out: list[Command]) -> None:
        if self.phase in (Phase.THINKING, Phase.AGENT_SPEAKING) or self._audible():
            self._barge_in(ev.now, "client", hard=True, out=out)

    def _on_tick(self, ev: Tick, out: list[Command]) -> None:
        self._end_on_verdict(ev.now, out)
        self._rescore(ev.now, out)
        rec = self.turns.get(self.turn)
        if (rec is not None and not rec.done and not rec.heard and rec.turn > self._cancelled
                and rec.turn not in self._queued and rec.ended_at
                and (ev.now - rec.ended_at) * 1000 >= self.cfg.reply_timeout_ms):
            self._on_busy(JobBusy(ev.now, rec.turn, "reply",
                                  f"no answer {self.cfg.reply_timeout_ms / 1000:g} s after the end of the turn"), out)
        if self._speech_since is not None and self._pending_barge is None and self._audible(heard_only=True):
            if (ev.now - self._speech_since) * 1000 >= self.cfg.barge_in_min_speech_ms:
                self._barge_in(ev.now, "vad", hard=False, out=out)
        if self._pending_barge is not None:
            turn, deadline = self._pending_barge
            if ev.now >= deadline and self._speech_since is None:
                self._pending_barge = None
                self._paused = False
                out.append(Playout("resume"))
                out.append(Record("false_interruption", turn))
                out.append(Control({"type": "false_interruption", "turn": turn}))
                if self._audible():
                    self._set_phase(Phase.AGENT_SPEAKING, turn, out)

    def _barge_in(self, now: float, source: str, hard: bool, out: list[Command]) -> None:
        turn = self.agent_turn if self.agent_turn >= 0 else self.turn
        out.append(Record("interrupt", turn, {"source": source}))
        if hard:
            self._flush_heard(turn, out)
            self._pending_barge = None
        else:
            self._paused = True
            out.append(Playout("pause"))
            self._pending_barge = (turn, now + self.cfg.false_interrupt_timeout_ms / 1000)
        self._cancel(turn, f"barge-in ({source})", out)
        out.append(Control({"type": "interrupted", "turn": turn, "source": source, "ts": now}))
        self._set_phase(Phase.USER_SPEAKING if source == "vad" else Phase.LISTENING, turn, out)

    def _confirm_barge_in(self, out: list[Command]) -> None:
        assert self._pending_barge is not None
        turn, _ = self._pending_barge
        self._pending_barge = None
        self._flush_heard(turn, out)

    def _flush_heard(self, turn: int, out: list[Command]) -> None:
        """Drop the rest of `turn`'s audio; the context then holds what the caller heard of it."""
        out.append(Playout("flush", turn))
        self._flushed = max(self._flushed, turn)
        if self._paused:
            self._paused = False
            out.append(Playout("resume"))
        rec = self.turns.get(turn)
        if rec is not None and not rec.interrupted:
            rec.interrupted = rec.done = True
            out.append(CommitHeard(turn))

    def _set_phase(self, phase: Phase, turn: int, out: list[Command]) -> None:
        if phase != self.phase:
            self.phase = phase
            out.append(SetPhase(phase, turn))


_HANDLERS: dict[type, Any] = {
    VadStart: TurnMachine._on_vad_start,
    VadPause: TurnMachine._on_vad_pause,
    VadResume: TurnMachine._on_vad_resume,
    VadEnd: TurnMachine._on_vad_end,
    EotVerdict: TurnMachine._on_eot,
    TranscriptIn: TurnMachine._on_transcript,
    TokenIn: TurnMachine._on_token,
    AudioQueued: TurnMachine._on_audio_queued,
    FramePlayed: TurnMachine._on_frame_played,
    ClientInterrupt: TurnMachine._on_interrupt,
    JobFailedIn: TurnMachine._on_job_failed,
    JobCancelledIn: TurnMachine._on_job_cancelled,
    JobBusy: TurnMachine._on_busy,
    Tick: TurnMachine._on_tick,
}
