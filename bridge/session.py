"""One live call: feeds its events to the turn machine and applies the commands it returns.

Every turn-taking decision (barge-in, speculation, merges, end of turn) is in
`bridge.turns`; this module does the I/O those decisions need: it publishes
caller frames and events, queues jobs through the router, writes the
conversation context, drives the playout queue, asks the end-of-turn model,
talks to the caller through its transport's sink, and keeps each turn's
latency waterfall (`bridge.waterfall`). It knows its bridge only through the
narrow `SessionHost` interface.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import redis.asyncio as aioredis

from shared import metrics
from shared.bus import BatchPublisher
from shared.cancel import publish_cancel
from shared.config import BridgeConfig
from shared.opus import OpusEncoder
from shared.protocol import (
    FRAME_SAMPLES,
    AsrJob,
    AudioFrame,
    AudioOut,
    Cancel,
    Cancelled,
    ChatMessage,
    EotDecision,
    EotJob,
    JobDropped,
    JobFailed,
    JobRun,
    Keys,
    LlmJob,
    OpusFrame,
    OpusOut,
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
from shared.routing import Router

from . import turn_events as ev
from .audio import Framer
from .call_trace import CallTrace
from .playout import OutFrame, Playout
from .session_records import playout_mark, record
from .turns import TurnConfig, TurnMachine
from .waterfall import TurnTimes

if TYPE_CHECKING:
    from .context import SessionContext

log = logging.getLogger("voxbus.session")

TurnState = ev.Phase  # the name the transports and tests use
EOT_PRE_SPEECH_FRAMES = 25  # the end-of-turn model hears 500 ms before the utterance, as pipecat feeds it
EOT_WINDOW_FRAMES = 400  # and at most its last 8 s (the model's window)
FRAME_TS_RING = 512  # ~10 s of frame capture times: the end of speech is never older when its turn ends


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


class SessionHost(Protocol):
    """What a session needs from its bridge."""

    redis: aioredis.Redis
    publisher: BatchPublisher
    router: Router

    @property
    def bridge_config(self) -> BridgeConfig: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


def turn_config(cfg: BridgeConfig) -> TurnConfig:
    return TurnConfig(
        barge_in_min_speech_ms=cfg.barge_in_min_speech_ms, false_interrupt_timeout_ms=cfg.false_interrupt_timeout_ms,
        eot=cfg.eot, eot_threshold=cfg.eot_threshold, min_endpoint_ms=cfg.min_endpoint_ms,
        rescore_ms=cfg.eot_rescore_ms, pause_ms=cfg.preemptive_pause_ms, busy_message=cfg.busy_message,
        reply_timeout_ms=cfg.reply_timeout_ms,
    )


class CallSession:
    def __init__(self, host: SessionHost, sid: str, context: SessionContext, *, pools: dict[str, str] | None = None,
                 sink: ClientSink | None = None, out_rate: int = 48_000, transport: str = "webrtc") -> None:
        self.host = host
        self.id = sid
        self.context = context
        self.pools = pools or {}
        self.sink: ClientSink = sink or NullSink()
        self.cfg = host.bridge_config
        self.machine = TurnMachine(turn_config(self.cfg))
        self.playout = Playout(out_rate)
        self.times: dict[int, TurnTimes] = {}
        self.started = time.time()
        self.trace = CallTrace(sid, transport, self.started)  # OpenTelemetry spans (no-ops unless configured)
        self.last_audio_at = self.started  # when caller audio last arrived (the idle timeout counts from here)
        self.closed = False
        self.expiring = False  # a limit (duration, idle) is ending the call
        # How the transport hangs up this call (set by it); the bridge calls it when a limit ends the call.
        self.hangup: Callable[[str], Awaitable[None]] | None = None
        self._framer = Framer(FRAME_SAMPLES)
        self._opus = OpusEncoder() if self.cfg.audio_codec == "opus" else None
        self._frames: list[tuple[int, bytes, float]] = []
        self._seq = 0
        # Capture time of the recent caller frames, by seq modulo the ring (the end of speech of a
        # turn is looked up here): 4 KB a session instead of a dict of thousands of floats.
        self._frame_ts = np.zeros(FRAME_TS_RING, dtype=np.float64)
        self._user_entries: dict[int, bytes] = {}  # turn -> its user message in the context
        self._heard_turns: set[int] = set()  # turns cut by a barge-in: their context entry is what was heard

    # ---------------------------------------------------------------- what the transports and tests read
    @property
    def state(self) -> ev.Phase:
        return self.machine.phase

    @property
    def turn(self) -> int:
        return self.machine.turn

    @property
    def agent_turn(self) -> int:
        return self.machine.agent_turn

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
        self.last_audio_at = time.time()
        key = Keys.audio_in(self.id)
        publish = self.host.publisher.publish_nowait
        for frame in frames:
            pcm = frame.tobytes()
            seq = self._seq
            msg = (OpusFrame(session=self.id, seq=seq, opus=self._opus.encode(frame), ts=ts) if self._opus is not None
                   else AudioFrame(session=self.id, seq=seq, pcm=pcm, ts=ts))
            publish(key, msg, entry_id=frame_entry_id(seq))
            self._frames.append((seq, pcm, ts))
            self._seq = seq + 1

    def next_frame(self) -> OutFrame | None:
        """The agent frame to send now (None: send silence)."""
        frame = self.playout.next_frame()
        if frame is None:
            return None
        if frame.first or frame.last:
            now = time.time()
            if frame.first:
                t = self._times(frame.turn)
                t.first_audio_ts = self.playout.turns[frame.turn].first_sent_at or now
                if t.speech_end_ts:
                    metrics.VOICE_TO_VOICE_MS.observe((t.first_audio_ts - t.speech_end_ts) * 1000)
            playout_mark(self.host.publisher, self.id, frame.turn, "start" if frame.first else "end",
                         self.playout.played_ms(frame.turn))
            if frame.last:
                self._times(frame.turn).set_playout(self.playout.turn_stats(frame.turn))
            self._run(ev.FramePlayed(now, frame.turn, first=frame.first, last=frame.last))
            self._send_waterfall(self._times(frame.turn))
        return frame if frame.pcm else None

    def interrupt(self, source: str = "client") -> None:
        """Client asked the agent to stop (control channel). Safe to call any time."""
        self._run(ev.ClientInterrupt(time.time()))

    # ---------------------------------------------------------------- bridge side
    def take_frames(self) -> list[tuple[int, bytes, float]]:
        frames, self._frames = self._frames, []
        frame_ts = self._frame_ts
        for seq, _, ts in frames:
            frame_ts[seq % FRAME_TS_RING] = ts
        return frames

    def frame_ts(self, seq: int) -> float | None:
        """When caller frame `seq` was captured, if it is recent enough to be remembered."""
        if not 0 <= self._seq - 1 - seq < FRAME_TS_RING:
            return None
        return float(self._frame_ts[seq % FRAME_TS_RING]) or None

    async def on_vad(self, event: SpeechStart | SpeechPause | SpeechEnd) -> None:
        self.host.publisher.publish_nowait(Keys.events(self.id), event)
        now = time.time()
        if isinstance(event, SpeechStart):
            await self._feed(ev.VadStart(now, event.frame))
        elif isinstance(event, SpeechPause):
            await self._feed(ev.VadResume(now) if event.resumed else ev.VadPause(now, event.start_frame, event.end_frame))
        else:
            await self._feed(ev.VadEnd(now, event.start_frame, event.end_frame, event.silence_ms))

    def tick(self, now: float) -> None:
        self._run(ev.Tick(now))

    async def on_message(self, msg: Any) -> None:
        now = time.time()
        if isinstance(msg, AudioOut | OpusOut):
            if msg.seq == 0 and msg.turn >= self.playout.min_turn:
                hop = self._times(msg.turn).hops["audio_out"] = max(0.0, (now - msg.ts) * 1000)
                metrics.BUS_HOP_MS.labels("audio_out").observe(hop)
            if self.playout.add(msg) or msg.final:
                await self._feed(ev.AudioQueued(now, msg.turn, msg.final))
        elif isinstance(msg, TokenChunk):
            await self._feed(ev.TokenIn(now, msg.turn, msg.seq, msg.text, msg.final))
        elif isinstance(msg, Transcript):
            if msg.final:
                t = self._times(msg.turn)
                if not t.transcript_ts:
                    t.user_text, t.asr_ms, t.transcript_ts = msg.text, msg.asr_ms, now
                    t.hops["transcript"] = max(0.0, (now - msg.ts) * 1000)
                    metrics.BUS_HOP_MS.labels("transcript").observe(t.hops["transcript"])
            await self._feed(ev.TranscriptIn(now, msg.turn, msg.text, msg.final))
        elif isinstance(msg, EotDecision):
            metrics.EOT_COST_MS.observe(msg.cost_ms)
            await self._feed(ev.EotVerdict(now, msg.turn, msg.prob))
        elif isinstance(msg, TurnMark):
            self._times(msg.turn).apply_mark(msg.stage, msg.mark, msg.value_ms)
        elif isinstance(msg, JobRun):
            self.trace.job_ended(msg)
        elif isinstance(msg, JobFailed):
            log.warning("session %s turn %d: %s job failed: %s", self.id, msg.turn, msg.stage, msg.reason)
            await self._feed(ev.JobFailedIn(now, msg.turn, msg.stage, msg.reason))
        elif isinstance(msg, Cancelled):
            await self._feed(ev.JobCancelledIn(now, msg.turn, msg.stage))
        elif isinstance(msg, JobDropped):
            await self._feed(ev.JobBusy(now, msg.turn, msg.stage, f"the {msg.stage} pool is overloaded "
                                        f"(the job waited {msg.late_ms:.0f} ms past its deadline)"))

    # ---------------------------------------------------------------- applying commands
    async def _feed(self, event: ev.Event) -> None:
        """Hand an event to the machine and apply what it decides, Redis work included."""
        pending = self._apply(self.machine.handle(event))
        if pending:
            await self._apply_io(pending)

    def _run(self, event: ev.Event) -> None:
        """`_feed` for callers that cannot wait (media pacing, data-channel callbacks, timers)."""
        pending = self._apply(self.machine.handle(event))
        if pending:
            self.host.spawn(self._apply_io(pending))

    def _apply(self, commands: list[ev.Command]) -> list[ev.Command]:
        """Apply what needs no Redis round trip now, in order; return the rest (applied in order after)."""
        later: list[ev.Command] = []
        for cmd in commands:
            if isinstance(cmd, ev.Playout):
                self._playout(cmd)
            elif isinstance(cmd, ev.SetPhase):
                self.sink.send_control({"type": "state", "state": cmd.phase.value, "turn": cmd.turn, "ts": time.time()})
                if cmd.phase is ev.Phase.LISTENING:
                    self.trace.turn_over(cmd.turn, self.times.get(cmd.turn))
            elif isinstance(cmd, ev.SendTokens):
                self.sink.send_tokens(cmd.turn, cmd.seq, cmd.text, cmd.final)
                t = self._times(cmd.turn)
                t.tokens.append(cmd.text)
                if cmd.final:
                    t.agent_text = "".join(t.tokens).strip()
            elif isinstance(cmd, ev.Control):
                self.sink.send_control(cmd.msg)
            elif isinstance(cmd, ev.Record):
                self._record(cmd)
            elif isinstance(cmd, ev.CommitHeard):
                heard = self._commit_heard(cmd.turn)
                if heard:
                    later.append(ev.AppendAgentText(cmd.turn, heard))
                    self._heard_turns.add(cmd.turn)
            else:
                later.append(cmd)
        return later

    async def _apply_io(self, commands: list[ev.Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, ev.SubmitAsr):
                await self._submit("asr", AsrJob(session=self.id, turn=cmd.turn, start_seq=cmd.start_frame,
                                                 end_seq=cmd.end_frame))
            elif isinstance(cmd, ev.ScoreTurn):
                # Up to the newest frame: the model expects the silence after the words too.
                end = max(cmd.end_frame, self._seq - 1)
                start = max(cmd.start_frame - EOT_PRE_SPEECH_FRAMES, end - EOT_WINDOW_FRAMES + 1, 0)
                await self._submit("eot", EotJob(session=self.id, turn=cmd.turn, start_seq=start, end_seq=end))
            elif isinstance(cmd, ev.StartReply):
                entry = encode(ChatMessage(session=self.id, role="user", text=cmd.text, turn=cmd.turn))
                self._user_entries[cmd.turn] = entry
                for old in [t for t in self._user_entries if t < cmd.turn - 8]:
                    del self._user_entries[old]
                await self.context.append(entry)
                await self._submit("llm", LlmJob(session=self.id, turn=cmd.turn))
                await self._submit("tts", TtsJob(session=self.id, turn=cmd.turn))
            elif isinstance(cmd, ev.Say):
                await self._submit("tts", TtsJob(session=self.id, turn=cmd.turn, text=cmd.text), deadline=False)
            elif isinstance(cmd, ev.CancelTurn):
                await publish_cancel(self.host.redis, Cancel(session=self.id, turn=cmd.turn, reason=cmd.reason))
            elif isinstance(cmd, ev.RemoveUserText):
                removed = self._user_entries.pop(cmd.turn, None)
                if removed is not None:
                    await self.context.remove(removed)
            elif isinstance(cmd, ev.AppendAgentText):
                interrupted = cmd.turn in self._heard_turns
                msg = ChatMessage(session=self.id, role="assistant", text=cmd.text, turn=cmd.turn, interrupted=interrupted)
                await self.context.append(encode(msg))

    def _playout(self, cmd: ev.Playout) -> None:
        if cmd.op == "hold":
            self.playout.hold_from = cmd.turn
        elif cmd.op == "release":
            self.playout.hold_from = None
        elif cmd.op == "flush":
            played_ms = self.playout.played_ms(cmd.turn)
            dropped = self.playout.flush(cmd.turn)
            if dropped:
                playout_mark(self.host.publisher, self.id, cmd.turn, "flushed", played_ms)
                log.info("session %s: turn %d cancelled, %d frames dropped", self.id, cmd.turn, dropped)
        elif cmd.op == "pause":
            self.playout.pause()
        else:
            self.playout.resume()

    def _commit_heard(self, turn: int) -> str:
        """Record what the caller heard of `turn` (cut by a barge-in) and show it to them."""
        t = self._times(turn)
        t.interrupted = True
        t.heard_text = self.playout.heard_text(turn)
        t.agent_text = t.agent_text or "".join(t.tokens).strip()
        self.sink.send_control({"type": "heard", "turn": turn, "text": t.heard_text, "full": t.agent_text})
        return t.heard_text

    def _record(self, cmd: ev.Record) -> None:
        """Into the session's events (the recording), the metrics and the waterfall."""
        record(self.host.publisher, self.id, cmd, self._times(cmd.turn), self.frame_ts)

    async def _submit(self, stage: str, job: Any, *, deadline: bool = True) -> None:
        limit = self.cfg.job_deadline_s.get(stage) if deadline else None
        if limit:
            job.deadline = time.time() + limit
        if self.trace.on:
            start = self.frame_ts(job.start_seq) if isinstance(job, AsrJob | EotJob) else None
            job.trace = self.trace.job(stage, job.turn, self.pools.get(stage, ""), start)
        try:
            route = await self.host.router.submit(self.host.publisher, stage, job, self.pools.get(stage))  # type: ignore[arg-type]
        except Exception as exc:  # Redis refused the job: the turn fails as if its job had been dead-lettered
            failed = JobFailed(session=self.id, turn=job.turn, stage=stage, reason=f"could not queue the job: {exc}")
            with contextlib.suppress(Exception):  # into the recording, if Redis takes this at least
                await self.host.publisher.publish(Keys.events(self.id), failed)
            await self.on_message(failed)
            return
        if route.overflowed_from:
            self._times(job.turn).overflow.append(f"{stage}:{route.overflowed_from}->{route.pool}")

    # ---------------------------------------------------------------- the waterfall
    def _times(self, turn: int) -> TurnTimes:
        t = self.times.get(turn)
        if t is None:
            t = self.times[turn] = TurnTimes(turn)
            for old in [k for k in self.times if k < turn - 20]:
                del self.times[old]
        return t

    def _send_waterfall(self, t: TurnTimes) -> None:
        self.sink.send_control({"type": "turn_metrics", **t.waterfall()})

    def stats(self) -> dict[str, Any]:
        return {"session": self.id, "state": self.state.value, "turn": self.turn, "stale_frames": self.playout.stale_frames,
                "frames_sent": self.playout.frames_sent, "turns": [t.waterfall() for t in self.times.values()]}
