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

import numpy as np

from shared.protocol import AudioOut

from .audio import Framer, Resampler


@dataclass(slots=True)
class OutFrame:
    pcm: bytes
    turn: int
    clause: int
    first: bool = False  # first frame of its turn
    last: bool = False  # last frame of its turn


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


class Playout:
    def __init__(self, out_rate: int = 48_000, frame_ms: int = 20) -> None:
        self.out_rate = out_rate
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

    def _turn(self, turn: int) -> TurnAudio:
        ta = self.turns.get(turn)
        if ta is None:
            ta = self.turns[turn] = TurnAudio(turn)
            for old in [t for t in self.turns if t < turn - 4]:
                del self.turns[old]
        return ta

    def add(self, chunk: AudioOut) -> int:
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
        if ta.resampler is None or ta.rate != chunk.rate:
            ta.resampler, ta.rate = Resampler(chunk.rate, self.out_rate), chunk.rate
            self._framer.clear()
        pcm = ta.resampler.push(np.frombuffer(chunk.pcm, dtype=np.int16)) if chunk.pcm else np.zeros(0, np.int16)
        frames = self._framer.push(pcm)
        if chunk.final:
            ta.final = True
            rest = self._framer.push(ta.resampler.flush())
            frames += rest
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
        if self.paused or not self._frames:
            return None
        if self.hold_from is not None and self._frames[0].turn >= self.hold_from:
            return None
        frame = self._frames.popleft()
        ta = self.turns.get(frame.turn)
        if ta is not None:
            if ta.first_sent_at is None and frame.pcm:
                ta.first_sent_at = time.time()
                frame.first = True
            if frame.pcm:
                ta.played[frame.clause] += 1
        if frame.turn < self.min_turn:
            self.stale_frames += 1
        if frame.pcm:
            self.frames_sent += 1
        return frame

    def flush(self, turn: int) -> int:
        """Drop every queued frame of `turn` and earlier, refuse their later chunks."""
        self.min_turn = max(self.min_turn, turn + 1)
        self.cancelled_at = time.time()
        before = len(self._frames)
        self._frames = collections.deque(f for f in self._frames if f.turn > turn)
        self._framer.clear()
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

    def heard_text(self, turn: int) -> str:
        ta = self.turns.get(turn)
        return ta.heard_text() if ta else ""
