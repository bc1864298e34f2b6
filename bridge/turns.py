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
  given at a pause: at once when its probability is >= `eot_fast_threshold`,
  else after `min_endpoint_ms` of silence, and either way after at least
  `min_endpoint_per_s` of silence per second the turn has lasted (a caller
  who has held the floor a while gets longer to go on); or else the VAD's end
  of speech after `max_endpoint_ms`. With `eot_language` set, a "complete"
  also waits for the pause's (preemptive) transcript, and a transcript that
  ends on a continuation cue ("a table for", "My name is", "um", "5 5 5": see
  bridge/turn_text.py) leaves the end to the VAD. The audio model hears how
  the caller stopped, the words say where: either can keep the turn open.
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

from typing import Any

from .turn_events import (
    AudioQueued,
    ClientInterrupt,
    Command,
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
    ScoreTurn,
    SubmitAsr,
    Tick,
    TokenIn,
    TranscriptIn,
    VadEnd,
    VadPause,
    VadResume,
    VadStart,
)
from .turn_replies import ReplyRules
from .turn_state import Spec, TurnConfig, TurnRecord
from .turn_text import continuation_cue, cues_for

__all__ = ["TurnConfig", "TurnMachine", "TurnRecord"]


class TurnMachine(ReplyRules):

    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        _HANDLERS[type(event)](self, event, out)
        return out

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
        spec = self._spec = Spec(self.turn, start, ev.end_frame, ev.now)
        out.append(Playout("hold", spec.turn))
        out.append(SubmitAsr(spec.turn, start, ev.end_frame))
        out.append(Record("preemptive", spec.turn, {"outcome": "started"}))
        if self.cfg.eot != "none":
            self._score(spec, ev.now, out)

    def _on_vad_end(self, ev: VadEnd, out: list[Command]) -> None:
        self._speech_since = None
        if ev.end_frame <= self._ended_through and self._merge_from is None:
            return  # the model already ended this speech; the VAD's timeout only confirms it
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

    def _on_transcript(self, ev: TranscriptIn, out: list[Command]) -> None:
        super()._on_transcript(ev, out)
        spec = self._spec
        if (not ev.final or spec is None or spec.turn != ev.turn or not self.cfg.eot_language
                or self.cfg.eot == "none"):
            return
        spec.cue = continuation_cue(ev.text, cues_for(self.cfg.eot_language, self.cfg.eot_extra_cues),
                                    self.cfg.eot_unpunctuated)
        if spec.cue is not None:
            out.append(Record("eot_cue", spec.turn, {"cue": spec.cue}))
        self._end_on_verdict(ev.now, out)

    def _score(self, spec: Spec, now: float, out: list[Command]) -> None:
        spec.scoring, spec.scored_at = True, now
        out.append(ScoreTurn(spec.turn, spec.start_frame, spec.end_frame))

    def _rescore(self, now: float, out: list[Command]) -> None:
        """The caller is still silent after an "incomplete": ask the model again, with the longer silence."""
        spec = self._spec
        if (spec is None or spec.scoring or spec.prob is None or self.cfg.rescore_ms <= 0
                or spec.prob >= self.cfg.eot_threshold or spec.cue is not None):
            return  # (after a continuation cue no verdict can end the turn: the VAD's timeout will)
        if (now - spec.scored_at) * 1000 + 1e-6 >= self.cfg.rescore_ms:
            self._score(spec, now, out)

    def _end_on_verdict(self, now: float, out: list[Command]) -> None:
        spec = self._spec
        if spec is None or spec.prob is None or spec.prob < self.cfg.eot_threshold:
            return
        if self.cfg.eot_language and (spec.transcript is None or spec.cue is not None):
            return  # the words so far are not in yet (the reply waits for them anyway), or want more
        silence_ms = (now - spec.paused_at) * 1000 + self.cfg.pause_ms
        fast = spec.prob >= self.cfg.eot_fast_threshold and self.cfg.eot_fast_threshold < 1.0
        turn_s = (spec.end_frame - spec.start_frame + 1) * self.cfg.frame_ms / 1000
        wait_ms = max(0.0 if fast else self.cfg.min_endpoint_ms, turn_s * self.cfg.min_endpoint_per_s)
        if silence_ms + 1e-6 >= wait_ms:
            self._end_turn(now, spec.turn, spec.start_frame, spec.end_frame, "model", silence_ms, out)

    def _start_of(self, frame: int) -> int:
        if self._merge_from is not None:
            return min(frame, self._merge_from)
        # The VAD's utterance can span a turn the model already ended at a pause (the caller spoke
        # again before the VAD's silence timeout): the new turn starts after the ended one.
        return max(frame, self._ended_through + 1)

    # ------------------------------------------------------------- the end of a turn

    def _end_turn(self, now: float, turn: int, start: int, end: int, by: str, silence_ms: float,
                  out: list[Command]) -> None:
        self._merge_from = None
        self._ended_through = max(self._ended_through, end)
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
