"""One live call: the turn state machine, its context and its playout.

States: listening -> user_speaking (VAD start) -> thinking (end of speech: ASR
job; final transcript: LLM + TTS jobs, TTS following the tokens) ->
agent_speaking (first agent frame sent) -> listening (last frame sent).

Barge-in:
- a client `interrupt` kills the turn at once: the playout queue is flushed
  synchronously (no frame of the turn leaves after it), the cancel is
  published, and the context gets the text the caller actually heard;
- the bridge's VAD hearing the caller over the agent for `barge_in_min_speech_ms`
  (a separate bound while thinking) pauses playout at once and cancels the
  generation; a non-empty transcript of the new speech confirms it (flush,
  heard text into the context); if none comes within
  `false_interrupt_timeout_ms`, playout resumes where it paused (a false
  interruption, recorded as an event).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from shared import metrics
from shared.cancel import publish_cancel
from shared.protocol import (
    FRAME_SAMPLES,
    AsrJob,
    AudioFrame,
    AudioOut,
    Cancel,
    Cancelled,
    ChatMessage,
    Interrupt,
    JobFailed,
    Keys,
    LlmJob,
    SpeechEnd,
    SpeechPause,
    SpeechStart,
    TokenChunk,
    Transcript,
    TtsJob,
    TurnMark,
    encode,
    frame_entry_id,
)

from .audio import Framer
from .playout import OutFrame, Playout

if TYPE_CHECKING:
    from .context import SessionContext
    from .core import Bridge

log = logging.getLogger("voxbus.session")


class TurnState(str, enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    AGENT_SPEAKING = "agent_speaking"


class ClientSink(Protocol):
    """How a transport talks back to its caller."""

    def send_tokens(self, turn: int, seq: int, text: str, final: bool) -> None:
        """Token deltas on the unreliable `llm_tokens` channel."""

    def send_control(self, msg: dict[str, Any]) -> None:
        """Session metadata on the reliable `control` channel (JSON-able dict)."""


class NullSink:
    def send_tokens(self, turn: int, seq: int, text: str, final: bool) -> None:
        return None

    def send_control(self, msg: dict[str, Any]) -> None:
        return None


@dataclass
class TurnTimes:
    """Per-turn marks for the latency waterfall (wall-clock seconds / ms)."""

    turn: int
    speech_end_ts: float = 0.0  # capture time of the last voiced frame
    endpoint_ts: float = 0.0  # when the VAD decided the turn ended
    endpoint_ms: float = 0.0
    transcript_ts: float = 0.0
    asr_ms: float = 0.0
    llm_ttft_ms: float = 0.0
    tts_first_audio_ms: float = 0.0
    first_audio_ts: float = 0.0  # first agent frame handed to the transport
    user_text: str = ""
    agent_text: str = ""
    heard_text: str = ""
    interrupted: bool = False
    overflow: list[str] = field(default_factory=list)
    tts_first_clause_ms: float = 0.0  # TTS job start -> first clause of tokens ready
    hops: dict[str, float] = field(default_factory=dict)  # Redis hops on the critical path, ms

    @property
    def bus_overhead_ms(self) -> float:
        return sum(self.hops.values())

    def waterfall(self) -> dict[str, Any]:
        resp = (self.first_audio_ts - self.endpoint_ts) * 1000 if self.first_audio_ts and self.endpoint_ts else None
        return {
            "turn": self.turn, "endpoint_ms": round(self.endpoint_ms, 1), "asr_ms": round(self.asr_ms, 1),
            "llm_ttft_ms": round(self.llm_ttft_ms, 1), "tts_first_audio_ms": round(self.tts_first_audio_ms, 1),
            "response_ms": round(resp, 1) if resp is not None else None,
            "speech_end_ts": self.speech_end_ts, "endpoint_ts": self.endpoint_ts, "first_audio_ts": self.first_audio_ts,
            "tts_first_clause_ms": round(self.tts_first_clause_ms, 1), "bus_overhead_ms": round(self.bus_overhead_ms, 2),
            "hops": {k: round(v, 2) for k, v in self.hops.items()},
            "user_text": self.user_text, "agent_text": self.agent_text, "interrupted": self.interrupted,
        }


@dataclass
class SpeculativeTurn:
    """A turn started at a pause in the caller's speech, not yet confirmed by the end of speech."""

    turn: int
    start_frame: int
    end_frame: int
    transcript: Transcript | None = None
    generating: bool = False
    ctx_entry: bytes | None = None  # the user message appended for it (removed if abandoned)
    held_tokens: list[TokenChunk] = field(default_factory=list)


class CallSession:
    def __init__(self, bridge: Bridge, sid: str, context: SessionContext, *, pools: dict[str, str] | None = None,
                 sink: ClientSink | None = None, out_rate: int = 48_000) -> None:
        self.bridge = bridge
        self.id = sid
        self.context = context
        self.pools = pools or {}
        self.sink: ClientSink = sink or NullSink()
        self.cfg = bridge.config.bridge
        self.state = TurnState.LISTENING
        self.turn = -1  # the latest user turn (incremented at each end of speech)
        self.agent_turn = -1  # the turn whose reply is being produced or played
        self.playout = Playout(out_rate)
        self.times: dict[int, TurnTimes] = {}
        self.started = time.time()
        self._framer = Framer(FRAME_SAMPLES)
        self._frames: list[tuple[int, bytes, float]] = []
        self._seq = 0
        self._frame_ts: dict[int, float] = {}
        self._speech_started_at: float | None = None
        self._pending_barge: tuple[int, float] | None = None  # (turn, deadline) of a VAD barge-in
        self._agent_tokens: dict[int, list[str]] = {}
        self._token_seq: dict[int, int] = {}
        self._spec: SpeculativeTurn | None = None
        self.closed = False

    # ---------------------------------------------------------------- transport side
    def push_audio(self, pcm16k: np.ndarray, capture_ts: float | None = None) -> None:
        """Caller audio, 16 kHz mono int16, any length, cut into 20 ms frames.

        Each frame is published at once (the publisher still puts every session's
        frames of one loop turn in one round trip); VAD sees them at the next tick.
        """
        frames = self._framer.push(pcm16k)
        if not frames:
            return
        ts = capture_ts or time.time()
        key = Keys.audio_in(self.id)
        publish = self.bridge.publisher.publish_nowait
        for frame in frames:
            pcm = frame.tobytes()
            seq = self._seq
            publish(key, AudioFrame(session=self.id, seq=seq, pcm=pcm, ts=ts), entry_id=frame_entry_id(seq))
            self._frames.append((seq, pcm, ts))
            self._seq = seq + 1

    def next_frame(self) -> OutFrame | None:
        """The agent frame to send now (None: send silence); drives agent_speaking/listening."""
        frame = self.playout.next_frame()
        if frame is None:
            return None
        if frame.first:
            t = self._times(frame.turn)
            t.first_audio_ts = self.playout.turns[frame.turn].first_sent_at or time.time()
            if t.speech_end_ts:
                metrics.VOICE_TO_VOICE_MS.observe((t.first_audio_ts - t.speech_end_ts) * 1000)
            self._set_state(TurnState.AGENT_SPEAKING, frame.turn)
            self._send_waterfall(t)
        if frame.last:
            self._finish_agent_turn(frame.turn)
        return frame if frame.pcm else None

    def interrupt(self, source: str = "client") -> None:
        """Client asked the agent to stop (control channel). Safe to call any time."""
        if self.state in (TurnState.THINKING, TurnState.AGENT_SPEAKING) or self.playout.audible:
            self._barge_in(source, hard=True)

    # ---------------------------------------------------------------- bridge side
    def take_frames(self) -> list[tuple[int, bytes, float]]:
        frames, self._frames = self._frames, []
        frame_ts = self._frame_ts
        for seq, _, ts in frames:
            frame_ts[seq] = ts
        if len(frame_ts) > 3000:  # seqs arrive in order, so the dict's first keys are the oldest
            for seq in list(islice(frame_ts, 1500)):
                del frame_ts[seq]
        return frames

    async def on_vad(self, event: SpeechStart | SpeechPause | SpeechEnd) -> None:
        pub = self.bridge.publisher
        pub.publish_nowait(Keys.events(self.id), event)
        if isinstance(event, SpeechPause):
            await self._on_pause(event)
            return
        if isinstance(event, SpeechStart):
            self._speech_started_at = time.time()
            if self.state in (TurnState.LISTENING, TurnState.USER_SPEAKING):
                self._set_state(TurnState.USER_SPEAKING, self.turn + 1)
            return
        self._speech_started_at = None
        spec = self._spec
        if spec is not None and (spec.start_frame, spec.end_frame) != (event.start_frame, event.end_frame):
            self._abandon_speculation("the utterance went on")
            spec = None
        if spec is None:
            self.turn += 1
        t = self._times(self.turn)
        t.endpoint_ts = time.time()
        t.speech_end_ts = self._frame_ts.get(event.end_frame, t.endpoint_ts)
        t.endpoint_ms = event.silence_ms
        metrics.ENDPOINTING_MS.observe(event.silence_ms)
        if self.state == TurnState.USER_SPEAKING:
            self._set_state(TurnState.THINKING, self.turn)
        if spec is None:
            job = AsrJob(session=self.id, turn=self.turn, start_seq=event.start_frame, end_seq=event.end_frame)
            await self._submit("asr", job)
            return
        await self._confirm_speculation(spec)

    async def _on_pause(self, event: SpeechPause) -> None:
        if event.resumed:
            if self._spec is not None:
                self._abandon_speculation("the caller spoke again")
            return
        if self._spec is not None:
            self._abandon_speculation("a newer pause")
        self.turn += 1  # the id is used up even if the turn is abandoned: cancels name turns
        self._spec = SpeculativeTurn(self.turn, event.start_frame, event.end_frame)
        self.playout.hold_from = self.turn
        metrics.PREEMPTIVE_TURNS.labels("started").inc()
        await self._submit("asr", AsrJob(session=self.id, turn=self.turn, start_seq=event.start_frame,
                                         end_seq=event.end_frame))

    def _abandon_speculation(self, why: str) -> None:
        spec = self._spec
        assert spec is not None
        self._spec = None
        self.playout.hold_from = None
        self.playout.flush(spec.turn)
        metrics.PREEMPTIVE_TURNS.labels("abandoned").inc()
        log.debug("session %s: speculative turn %d abandoned (%s)", self.id, spec.turn, why)
        self.bridge.spawn(publish_cancel(self.bridge.redis, Cancel(session=self.id, turn=spec.turn, reason=f"speculation: {why}")))
        if spec.ctx_entry is not None:
            self.bridge.spawn(self.context.remove(spec.ctx_entry))

    async def _confirm_speculation(self, spec: SpeculativeTurn) -> None:
        """The end of speech matches the speculative turn: its work (maybe its audio) counts now."""
        self._spec = None
        self.playout.hold_from = None
        metrics.PREEMPTIVE_TURNS.labels("confirmed").inc()
        for chunk in spec.held_tokens:
            self._on_token(chunk)
        if spec.transcript is not None:
            await self._on_transcript(spec.transcript)

    def tick(self, now: float) -> None:
        """Timers: barge-in after enough speech over the agent; false-interruption resume."""
        if self._speech_started_at is not None and self._pending_barge is None:
            if self.state in (TurnState.AGENT_SPEAKING, TurnState.THINKING) or self.playout.audible:
                need = self.cfg.barge_in_min_speech_ms if self.state == TurnState.AGENT_SPEAKING else self.cfg.barge_in_min_speech_thinking_ms
                if (now - self._speech_started_at) * 1000 >= need:
                    self._barge_in("vad", hard=False)
        if self._pending_barge is not None:
            turn, deadline = self._pending_barge
            if now >= deadline and self._speech_started_at is None:
                self._pending_barge = None
                self.playout.resume()
                self.bridge.publisher.publish_nowait(Keys.events(self.id), TurnMark(
                    session=self.id, turn=turn, stage="bridge", mark="false_interruption"))
                metrics.FALSE_INTERRUPTIONS.inc()
                self.sink.send_control({"type": "false_interruption", "turn": turn})
                if self.playout.queued:
                    self._set_state(TurnState.AGENT_SPEAKING, turn)

    async def on_message(self, msg: Any) -> None:
        if isinstance(msg, AudioOut):
            if msg.turn >= self.agent_turn:
                if msg.seq == 0:
                    hop = self._times(msg.turn).hops["audio_out"] = max(0.0, (time.time() - msg.ts) * 1000)
                    metrics.BUS_HOP_MS.labels("audio_out").observe(hop)
                self.playout.add(msg)
        elif isinstance(msg, TokenChunk):
            self._on_token(msg)
        elif isinstance(msg, Transcript):
            await self._on_transcript(msg)
        elif isinstance(msg, TurnMark):
            self._on_mark(msg)
        elif isinstance(msg, JobFailed):
            log.warning("session %s turn %d: %s job failed: %s", self.id, msg.turn, msg.stage, msg.reason)
            self.sink.send_control({"type": "error", "turn": msg.turn, "stage": msg.stage, "reason": msg.reason})
            if msg.turn == self.agent_turn or msg.turn == self.turn:
                self._set_state(TurnState.LISTENING, msg.turn)
        elif isinstance(msg, Cancelled):
            self.sink.send_control({"type": "cancelled", "turn": msg.turn, "stage": msg.stage})

    # ---------------------------------------------------------------- internals
    def _times(self, turn: int) -> TurnTimes:
        t = self.times.get(turn)
        if t is None:
            t = self.times[turn] = TurnTimes(turn)
            for old in [k for k in self.times if k < turn - 20]:
                del self.times[old]
        return t

    def _set_state(self, state: TurnState, turn: int) -> None:
        if state != self.state:
            self.state = state
            self.sink.send_control({"type": "state", "state": state.value, "turn": turn, "ts": time.time()})

    async def _submit(self, stage: str, job: Any) -> None:
        try:
            route = await self.bridge.router.submit(self.bridge.publisher, stage, job, self.pools.get(stage))  # type: ignore[arg-type]
        except Exception as exc:  # Redis refused the job: the turn fails as if its job had been dead-lettered
            failed = JobFailed(session=self.id, turn=job.turn, stage=stage, reason=f"could not queue the job: {exc}")
            with contextlib.suppress(Exception):  # into the recording, if Redis takes this at least
                await self.bridge.publisher.publish(Keys.events(self.id), failed)
            await self.on_message(failed)
            return
        if route.overflowed_from:
            self._times(job.turn).overflow.append(f"{stage}:{route.overflowed_from}->{route.pool}")

    async def _on_transcript(self, msg: Transcript) -> None:
        if not msg.final:
            self.sink.send_control({"type": "transcript", "role": "user", "final": False, "text": msg.text, "turn": msg.turn})
            return
        spec = self._spec
        if spec is not None and msg.turn == spec.turn:
            await self._on_speculative_transcript(spec, msg)
            return
        t = self._times(msg.turn)
        if not t.transcript_ts:
            t.user_text, t.asr_ms, t.transcript_ts = msg.text, msg.asr_ms, time.time()
            t.hops["transcript"] = max(0.0, (t.transcript_ts - msg.ts) * 1000)
            metrics.BUS_HOP_MS.labels("transcript").observe(t.hops["transcript"])
        self.sink.send_control({"type": "transcript", "role": "user", "final": True, "text": msg.text, "turn": msg.turn})
        if not msg.text.strip():
            if msg.turn == self.turn and self.state == TurnState.THINKING and self._pending_barge is None:
                self._set_state(TurnState.LISTENING, msg.turn)
            return
        if self._pending_barge is not None and msg.turn > self._pending_barge[0]:
            self._confirm_barge_in()
        if msg.turn < self.turn:
            return  # the caller already spoke again; the newer utterance gets the reply
        if self.agent_turn == msg.turn:
            return  # generation already started (a confirmed speculative turn)
        await self._start_generation(msg)
        if self.state in (TurnState.LISTENING, TurnState.THINKING):
            self._set_state(TurnState.THINKING, msg.turn)

    async def _start_generation(self, msg: Transcript) -> bytes:
        entry = encode(ChatMessage(session=self.id, role="user", text=msg.text, turn=msg.turn))
        await self.context.append(entry)
        self.agent_turn = msg.turn
        await self._submit("llm", LlmJob(session=self.id, turn=msg.turn))
        await self._submit("tts", TtsJob(session=self.id, turn=msg.turn))
        return entry

    async def _on_speculative_transcript(self, spec: SpeculativeTurn, msg: Transcript) -> None:
        """Record it, and start the reply at once: its audio stays held until the turn is confirmed."""
        spec.transcript = msg
        t = self._times(msg.turn)
        t.user_text, t.asr_ms, t.transcript_ts = msg.text, msg.asr_ms, time.time()
        t.hops["transcript"] = max(0.0, (t.transcript_ts - msg.ts) * 1000)
        if msg.text.strip() and not spec.generating:
            spec.generating = True
            spec.ctx_entry = await self._start_generation(msg)

    def _on_token(self, msg: TokenChunk) -> None:
        if msg.turn != self.agent_turn or msg.turn < self.playout.min_turn:
            return
        if self._spec is not None and msg.turn == self._spec.turn:
            self._spec.held_tokens.append(msg)  # the caller sees them once the turn is confirmed
            return
        if msg.seq < self._token_seq.get(msg.turn, 0):
            return  # duplicate
        self._token_seq[msg.turn] = msg.seq + 1
        self._agent_tokens.setdefault(msg.turn, []).append(msg.text)
        self.sink.send_tokens(msg.turn, msg.seq, msg.text, msg.final)
        if msg.final:
            self._times(msg.turn).agent_text = "".join(self._agent_tokens.get(msg.turn, [])).strip()

    def _on_mark(self, msg: TurnMark) -> None:
        t = self._times(msg.turn)
        if msg.stage == "llm" and msg.mark == "ttft":
            t.llm_ttft_ms = msg.value_ms
        elif msg.stage == "tts" and msg.mark == "first_audio":
            t.tts_first_audio_ms = msg.value_ms
        elif msg.stage == "tts" and msg.mark == "first_clause":
            t.tts_first_clause_ms = msg.value_ms
        elif msg.mark in ("queue_wait", "token_hop") and msg.stage in ("asr", "llm", "tts"):
            if msg.mark == "token_hop" or msg.stage != "tts":  # the TTS job waits for tokens off the critical path
                t.hops[f"{msg.stage}_{msg.mark}"] = msg.value_ms

    def _barge_in(self, source: str, hard: bool) -> None:
        turn = self.agent_turn if self.agent_turn >= 0 else self.turn
        metrics.BARGE_INS.labels(source).inc()
        self.bridge.publisher.publish_nowait(Keys.events(self.id), Interrupt(session=self.id, source=source, turn=turn))  # type: ignore[arg-type]
        if hard:
            dropped = self.playout.flush(turn)
            self._write_heard(turn)
            self._pending_barge = None
            log.info("session %s: %s interrupt, turn %d cancelled, %d frames dropped", self.id, source, turn, dropped)
        else:
            self.playout.pause()
            self._pending_barge = (turn, time.time() + self.cfg.false_interrupt_timeout_ms / 1000)
        self.bridge.spawn(publish_cancel(self.bridge.redis, Cancel(session=self.id, turn=turn, reason=f"barge-in ({source})")))
        self.sink.send_control({"type": "interrupted", "turn": turn, "source": source, "ts": time.time()})
        self._set_state(TurnState.USER_SPEAKING if source == "vad" else TurnState.LISTENING, turn)

    def _confirm_barge_in(self) -> None:
        assert self._pending_barge is not None
        turn, _ = self._pending_barge
        self._pending_barge = None
        self.playout.flush(turn)
        self.playout.resume()
        self._write_heard(turn)

    def _write_heard(self, turn: int) -> None:
        """The assistant turn in the context becomes what the caller actually heard."""
        t = self._times(turn)
        if t.interrupted:
            return
        t.interrupted = True
        t.heard_text = self.playout.heard_text(turn)
        t.agent_text = t.agent_text or "".join(self._agent_tokens.get(turn, [])).strip()
        if t.heard_text:
            msg = ChatMessage(session=self.id, role="assistant", text=t.heard_text, turn=turn, interrupted=True)
            self.bridge.spawn(self.context.append(encode(msg)))

    def _finish_agent_turn(self, turn: int) -> None:
        t = self._times(turn)
        t.agent_text = t.agent_text or "".join(self._agent_tokens.get(turn, [])).strip()
        if not t.interrupted and t.agent_text:
            msg = ChatMessage(session=self.id, role="assistant", text=t.agent_text, turn=turn)
            self.bridge.spawn(self.context.append(encode(msg)))
        self._send_waterfall(t)
        if self.state == TurnState.AGENT_SPEAKING and self._pending_barge is None:
            self._set_state(TurnState.LISTENING, turn)

    def _send_waterfall(self, t: TurnTimes) -> None:
        self.sink.send_control({"type": "turn_metrics", **t.waterfall()})

    def stats(self) -> dict[str, Any]:
        return {"session": self.id, "state": self.state.value, "turn": self.turn, "stale_frames": self.playout.stale_frames,
                "frames_sent": self.playout.frames_sent, "turns": [t.waterfall() for t in self.times.values()]}
