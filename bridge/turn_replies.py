"""The turn machine's rules for what follows the end of a turn: transcripts, the reply's tokens and
audio, failed and late jobs, and barge-in (see bridge/turns.py for the whole picture)."""

from __future__ import annotations

from .turn_events import (
    AppendAgentText,
    AudioQueued,
    ClientInterrupt,
    Command,
    CommitHeard,
    Control,
    FramePlayed,
    JobBusy,
    JobCancelledIn,
    JobFailedIn,
    Phase,
    Playout,
    Record,
    Say,
    SendTokens,
    StartReply,
    TokenIn,
    TranscriptIn,
)
from .turn_state import TurnRecord, TurnState


class ReplyRules(TurnState):

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
