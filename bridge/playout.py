"""Agent audio on its way to one caller: 20 ms frames at the transport's rate.

Chunks arrive from audio.out in (turn, seq) order; duplicates (a re-run TTS
job) and chunks of cancelled turns are dropped here. `flush` empties the
queue synchronously, so once an interrupt is handled no frame of the cancelled
turn can leave. `pause` holds frames back without dropping them (a possible
false interruption). The queue also knows which clause each frame speaks, so
the bridge can tell what the caller actually heard.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from shared.opus import OpusStreamDecoder
from shared.protocol import AudioOut, OpusOut

from .audio import Framer, Resampler


@dataclass(slots=True)
class OutFrame:
    pcm: bytes
    turn: int
    clause: int
    first: bool = False  # first frame of its turn
    last: bool = False  # last frame of its turn


class Underrun(NamedTuple):
    """Agent audio that was not there in time, mid-turn."""

    played: int  # frames of the turn played before the silence
    frames: int  # silent frames sent
    padded: int  # zero samples that completed the frame before them (the framer's rest, sent at once)


@dataclass
class TurnAudio:
    turn: int
    clauses: list[str] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # frames queued per clause
    played: list[int] = field(default_factory=list)  # frames sent per clause
    next_seq: int = 0
    final: bool = False
    first_sent_at: float | None = None  # wall clock of the first frame handed to the transport
    resampler: Resampler | None = None
    rate: int = 0
    decoder: OpusStreamDecoder | None = None  # the turn's Opus stream (OpusOut chunks)
    samples: int = 0  # audio queued for this turn so far, in samples at the output rate
    clause_starts: list[int] = field(default_factory=list)  # where each clause starts in the turn's audio (samples)
    onset: int | None = None  # the turn's first sample at or above ONSET_LEVEL (samples into its audio)
    underruns: list[Underrun] = field(default_factory=list)
    silent_run: int = 0  # silent ticks since the last frame of this turn
    padded: int = 0  # zero samples the last frame before those ticks was padded with
    last_sent: bool = False

    def heard_text(self) -> str:
        words: list[str] = []
        for text, queued, played in zip(self.clauses, self.frames, self.played):
            if played <= 0:
                break
            clause_words = text.split()
            if played >= queued:
                words += clause_words
            else:
                words += clause_words[: round(len(clause_words) * played / max(queued, 1))]
                break
        return " ".join(words)


ONSET_LEVEL = 328  # -40 dBFS: where the turn's audio starts, to line it up with a recording of it


@dataclass(frozen=True, slots=True)
class PlayoutStats:
    """How one turn played out (`Playout.turn_stats`)."""

    gap_ms: float  # longest underrun
    gaps: int  # underruns
    gap_total_ms: float
    clause_frames: list[int]  # frames played per clause
    clause_starts: list[int]  # samples at the output rate into the turn's audio
    onset: int | None
    underruns: list[Underrun]


class Playout:
    def __init__(self, out_rate: int = 48_000, frame_ms: int = 20) -> None:
        self.out_rate = out_rate
        self.frame_ms = frame_ms
        self.frame_samples = out_rate * frame_ms // 1000
        self._frames: collections.deque[OutFrame] = collections.deque()
        self._framer = Framer(self.frame_samples)
        self.turns: dict[int, TurnAudio] = {}
        self.min_turn = 0  # chunks of turns below this were cancelled
        self.paused = False
        self.hold_from: int | None = None  # frames of this turn and later wait (a turn not yet confirmed)
        self.cancelled_at: float | None = None
        self.stale_frames = 0  # frames of a cancelled turn handed out after its cancel (must stay 0)
        self.frames_sent = 0
        self._playing: TurnAudio | None = None  # first frame sent, last one not yet
        self._framer_turn = -1  # whose samples the framer holds

    def _turn(self, turn: int) -> TurnAudio:
        ta = self.turns.get(turn)
        if ta is None:
            ta = self.turns[turn] = TurnAudio(turn)
            for old in [t for t in self.turns if t < turn - 4]:
                del self.turns[old]
        return ta

    def add(self, chunk: AudioOut | OpusOut) -> int:
        """Queue a chunk; returns how many frames it added (0 if dropped)."""
        if chunk.turn < self.min_turn:
            return 0
        ta = self._turn(chunk.turn)
        if chunk.seq < ta.next_seq or ta.final:
            return 0  # duplicate from a re-run job
        ta.next_seq = chunk.seq + 1
        if chunk.text or not ta.clauses:
            ta.clauses.append(chunk.text)
            ta.frames.append(0)
            ta.played.append(0)
            ta.clause_starts.append(ta.samples)
        if isinstance(chunk, OpusOut):
            ta.decoder = ta.decoder or OpusStreamDecoder()
            decoded = [ta.decoder.decode(p) for p in chunk.packets]
            raw, rate = (np.concatenate(decoded) if decoded else np.zeros(0, np.int16)), OpusStreamDecoder.rate
        else:
            raw, rate = np.frombuffer(chunk.pcm, dtype=np.int16), chunk.rate
        if ta.resampler is None or ta.rate != rate:
            ta.resampler, ta.rate = Resampler(rate, self.out_rate), rate
            self._framer.clear()
        pcm = ta.resampler.push(raw) if raw.size else np.zeros(0, np.int16)
        if chunk.final:
            pcm = np.concatenate([pcm, ta.resampler.flush()])
            ta.final = True
        if ta.onset is None and pcm.size:
            loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) >= ONSET_LEVEL)
            if loud.size:
                ta.onset = ta.samples + int(loud[0])
        ta.samples += len(pcm)
        frames = self._framer.push(pcm)
        self._framer_turn = chunk.turn
        if chunk.final:
            tail = self._framer.pad_rest()
            if tail is not None:
                frames.append(tail)
        clause = len(ta.clauses) - 1
        for pcm_frame in frames:
            self._frames.append(OutFrame(pcm_frame.tobytes(), chunk.turn, clause))
        ta.frames[clause] += len(frames)
        if chunk.final and self._frames and self._frames[-1].turn == chunk.turn:
            self._frames[-1].last = True
        elif chunk.final:  # nothing left to queue: mark completion with an empty marker frame
            self._frames.append(OutFrame(b"", chunk.turn, clause, last=True))
        return len(frames)

    def next_frame(self) -> OutFrame | None:
        """The frame to send now, or None (send silence)."""
        if self.paused:
            return None
        if not self._frames:
            return self._underrun()
        if self.hold_from is not None and self._frames[0].turn >= self.hold_from:
            return None
        frame = self._frames.popleft()
        ta = self.turns.get(frame.turn)
        if ta is not None:
            if ta.first_sent_at is None and frame.pcm:
                ta.first_sent_at = time.time()
                frame.first = True
                self._playing = ta
            if frame.pcm:
                if (ta.silent_run or ta.padded) and not frame.last:  # silence before the end is no gap
                    ta.underruns.append(Underrun(sum(ta.played), ta.silent_run, ta.padded))
                ta.silent_run = ta.padded = 0
                ta.played[frame.clause] += 1
            if frame.last:
                ta.last_sent, ta.silent_run = True, 0
                if self._playing is ta:
                    self._playing = None
        if frame.turn < self.min_turn:
            self.stale_frames += 1
        if frame.pcm:
            self.frames_sent += 1
        return frame

    def _underrun(self) -> OutFrame | None:
        """Nothing queued: a silent tick, or the framer's last samples of the playing turn."""
        ta = self._playing
        if ta is None or ta.last_sent or ta.turn < self.min_turn:
            return None
        partial = ta.samples % self.frame_samples
        if self._framer_turn == ta.turn and partial and ta.clauses:
            tail = self._framer.pad_rest()
            if tail is not None:
                ta.padded = self.frame_samples - partial
                ta.samples += ta.padded
                clause = len(ta.clauses) - 1
                ta.frames[clause] += 1
                ta.played[clause] += 1
                self.frames_sent += 1
                return OutFrame(tail.tobytes(), ta.turn, clause)
        ta.silent_run += 1
        return None

    def turn_stats(self, turn: int) -> PlayoutStats | None:
        ta = self.turns.get(turn)
        if ta is None:
            return None
        runs = [u.frames * self.frame_ms + u.padded * 1000 / self.out_rate for u in ta.underruns]
        return PlayoutStats(gap_ms=round(max(runs, default=0.0), 1), gaps=len(runs),
                            gap_total_ms=round(sum(runs), 1), clause_frames=list(ta.played),
                            clause_starts=list(ta.clause_starts), onset=ta.onset, underruns=list(ta.underruns))

    def flush(self, turn: int) -> int:
        """Drop every queued frame of `turn` and earlier, refuse their later chunks."""
        self.min_turn = max(self.min_turn, turn + 1)
        self.cancelled_at = time.time()
        before = len(self._frames)
        self._frames = collections.deque(f for f in self._frames if f.turn > turn)
        self._framer.clear()
        if self._playing is not None and self._playing.turn <= turn:
            self._playing = None
        return before - len(self._frames)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    @property
    def queued(self) -> int:
        return len(self._frames)

    @property
    def audible(self) -> int:
        """Queued frames that are not held back (what the caller is hearing or about to)."""
        if self.hold_from is None:
            return len(self._frames)
        return sum(1 for f in self._frames if f.turn < self.hold_from)

    def played_ms(self, turn: int) -> float:
        """Agent audio of `turn` handed to the transport so far."""
        ta = self.turns.get(turn)
        return sum(ta.played) * self.frame_ms if ta else 0.0

    def heard_text(self, turn: int) -> str:
        ta = self.turns.get(turn)
        return ta.heard_text() if ta else ""
