"""Streaming endpointing: VAD window scores -> SpeechStart / SpeechEnd on 20 ms frame seqs.

`SpeechSegmenter` is one session: it re-chunks 20 ms frames (320 samples) into
the engine's windows (512 samples for Silero), remembers which frame seq each
sample came from, and runs a hysteresis state machine like Silero's VADIterator
(speech when prob >= threshold, silence only below a lower neg_threshold).
`BatchVad` holds every session of a bridge and scores all ready windows in one
batched engine call per round.

Per-frame and per-window work is what limits how many sessions one bridge
holds, so a session keeps its pending audio as raw PCM16 bytes (appending a
frame is a bytes copy, not an array concatenation), and `BatchVad.feed` /
`process` convert and measure (dBFS) all sessions' frames and windows in
single array operations; only the state machine runs per session.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bridge.vad import VadEngine
from shared.protocol import (
    FRAME_BYTES,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    SpeechEnd,
    SpeechPause,
    SpeechStart,
    validate_session_id,
)

log = logging.getLogger("voxbus.vad")

VadEvent = SpeechStart | SpeechPause | SpeechEnd
_MS = SAMPLE_RATE / 1000  # samples per millisecond


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    threshold: float = 0.5
    neg_threshold: float | None = None  # None: max(threshold - 0.15, 0.01), as Silero does
    min_speech_ms: float = 100.0  # voiced this long before SpeechStart (drops clicks)
    min_silence_ms: float = 550.0  # silence that ends the turn
    speech_pad_ms: float = 30.0  # added before the start and after the end
    max_speech_ms: float | None = 30_000.0  # force an end (Whisper's window); None: never
    max_gap_frames: int = 50  # missing seqs filled with silence, at most this many
    # Silero's probability stays high 50-150 ms after speech stops: the end is pulled back
    # over trailing frames quieter than the utterance's loudest window by this many dB,
    # at most end_trim_ms. None: no trimming (noisy lines never trim anyway).
    end_trim_db: float | None = 40.0
    end_trim_ms: float = 200.0
    # Report a SpeechPause after this much silence inside an utterance (and its resumption),
    # so the bridge can start ASR/LLM before min_silence_ms confirms the end. None: off.
    pause_ms: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold {self.threshold} outside (0, 1)")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold {self.neg_threshold} outside [0, threshold]")
        if min(self.min_speech_ms, self.min_silence_ms, self.speech_pad_ms, self.end_trim_ms) < 0 or self.max_gap_frames < 0:
            raise ValueError("durations and max_gap_frames must be >= 0")

    @property
    def negative(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


class SpeechSegmenter:
    """One session's endpointing. Samples are counted from the session's first frame."""

    def __init__(self, sid: str, config: EndpointConfig, window_samples: int) -> None:
        self.sid = validate_session_id(sid)
        self.config = config
        self.window = window_samples
        self._pcm = bytearray()  # received PCM16, not yet scored
        self._scored = 0  # samples scored so far = start of the next window
        self._frames: deque[tuple[int, int, float]] = deque()  # (seq, first sample, dBFS), oldest first
        self._last_seq: int | None = None
        self._pad = round(config.speech_pad_ms * _MS)
        self._min_speech = round(config.min_speech_ms * _MS)
        self._min_silence = round(config.min_silence_ms * _MS)
        self._max_speech = None if config.max_speech_ms is None else round(config.max_speech_ms * _MS)
        self._trim_max = round(config.end_trim_ms * _MS)
        self._lookback = self._pad + self._trim_max + max(self._min_speech, self._min_silence) + 2 * window_samples
        self._candidate: int | None = None  # first sample of a voiced run not yet confirmed
        self._candidate_prob = 0.0
        self._speech_start: int | None = None  # first sample of the confirmed utterance (no pad)
        self._start_frame = 0
        self._silence_start: int | None = None
        self._paused: SpeechPause | None = None  # the pause reported for the current silence run
        self._pause = None if config.pause_ms is None else round(config.pause_ms * _MS)
        self._peak_db = -200.0  # loudest window since the candidate start

    @property
    def in_speech(self) -> bool:
        return self._speech_start is not None

    @property
    def pending_samples(self) -> int:
        return len(self._pcm) >> 1

    def push(self, seq: int, pcm: bytes, rate: int = SAMPLE_RATE) -> None:
        """Append one 20 ms PCM16 frame; raises ValueError for a bad frame (state unchanged)."""
        self.check(seq, pcm, rate)
        self.append(seq, pcm, _dbfs(_to_float(pcm)))

    def check(self, seq: int, pcm: bytes, rate: int = SAMPLE_RATE) -> None:
        """Raise ValueError if `push(seq, pcm, rate)` would refuse the frame."""
        if rate != SAMPLE_RATE:
            raise ValueError(f"session {self.sid}: frame at {rate} Hz, expected {SAMPLE_RATE} Hz mono")
        if not isinstance(pcm, (bytes, bytearray, memoryview)) or len(pcm) != FRAME_BYTES:
            size = len(pcm) if isinstance(pcm, (bytes, bytearray, memoryview)) else type(pcm).__name__
            raise ValueError(f"session {self.sid}: frame of {size} bytes, expected {FRAME_BYTES} (20 ms PCM16)")
        if not isinstance(seq, int) or seq < 0:
            raise ValueError(f"session {self.sid}: bad frame seq {seq!r}")
        if self._last_seq is not None and seq <= self._last_seq:
            raise ValueError(f"session {self.sid}: frame seq {seq} not after {self._last_seq} (duplicate or late)")

    def append(self, seq: int, pcm: bytes, db: float) -> None:
        """Append a frame `check` accepted, whose level `db` (dBFS) the caller measured."""
        received = self._scored + self.pending_samples
        if self._last_seq is not None:
            # Lost frames become silence so window times stay frame times.
            for missing in range(self._last_seq + 1, min(seq, self._last_seq + 1 + self.config.max_gap_frames)):
                self._frames.append((missing, received, -200.0))
                self._pcm += _SILENT_FRAME
                received += FRAME_SAMPLES
        self._frames.append((seq, received, db))
        self._pcm += pcm
        self._last_seq = seq

    def next_window(self) -> np.ndarray | None:
        """The next unscored window (float32 in [-1, 1)), or None until enough samples arrived."""
        return _to_float(self.window_bytes()) if self.pending_samples >= self.window else None

    def window_bytes(self) -> bytearray:
        """The next window as PCM16 bytes (shorter while incomplete)."""
        return self._pcm[: 2 * self.window]

    def advance(self, prob: float, window_db: float | None = None) -> list[VadEvent]:
        """Consume the window `next_window()` returned, scored `prob`; returns the events it decides.
        `window_db`: its level in dBFS when the caller already measured it."""
        start, end = self._scored, self._scored + self.window
        if window_db is None:
            window_db = _dbfs(_to_float(self.window_bytes()))
        del self._pcm[: 2 * self.window]
        self._scored = end
        events = self._step(float(prob), start, end)
        if self._candidate is not None or self._speech_start is not None:
            self._peak_db = max(self._peak_db, window_db)
        else:
            self._peak_db = -200.0
        self._trim()
        return events

    def close(self) -> SpeechEnd | None:
        """End an open utterance at its last voiced sample (session leaving)."""
        if self._speech_start is None:
            return None
        return self._end(self._scored)

    def _step(self, prob: float, start: int, end: int) -> list[VadEvent]:
        cfg = self.config
        events: list[VadEvent] = []
        if self._speech_start is None:
            if self._candidate is None and prob >= cfg.threshold:
                self._candidate, self._candidate_prob = start, prob
            elif self._candidate is not None:
                if prob < cfg.negative:
                    self._candidate = None
                else:
                    self._candidate_prob = max(self._candidate_prob, prob)
            if self._candidate is not None and end - self._candidate >= self._min_speech:
                events.append(self._start())
            return events
        if prob >= cfg.threshold:
            self._silence_start = None
            if self._paused is not None:
                events.append(SpeechPause(session=self.sid, start_frame=self._paused.start_frame,
                                          end_frame=self._paused.end_frame, resumed=True))
                self._paused = None
        elif prob < cfg.negative and self._silence_start is None:
            self._silence_start = start
        # Silence counts from the last voiced sound (the trimmed end), not from where Silero's
        # probability finally dropped, so min_silence_ms is the pause a person actually left.
        silence = end - self._trimmed_end(self._silence_start) if self._silence_start is not None else 0
        if (self._pause is not None and self._paused is None and self._silence_start is not None
                and self._min_silence > silence >= self._pause):
            self._paused = SpeechPause(session=self.sid, start_frame=self._start_frame,
                                       end_frame=self._voiced_end_frame(end))
            events.append(self._paused)
        if self._silence_start is not None and silence >= self._min_silence:
            events.append(self._end(end))
        elif self._max_speech is not None and end - self._speech_start >= self._max_speech:
            self._silence_start = None
            events.append(self._end(end))
        return events

    def _start(self) -> SpeechStart:
        assert self._candidate is not None
        self._speech_start, self._silence_start = self._candidate, None
        self._start_frame = self._seq_at(max(self._candidate - self._pad, 0))
        self._candidate = None
        return SpeechStart(session=self.sid, frame=self._start_frame, prob=round(self._candidate_prob, 4))

    def _end(self, now: int) -> SpeechEnd:
        if self._silence_start is None:
            last, silence = now - 1, 0
        else:
            voiced_end = self._trimmed_end(self._silence_start)
            last, silence = min(voiced_end + self._pad, now) - 1, now - voiced_end
        self._speech_start = self._silence_start = None
        self._paused = None
        end_frame = max(self._seq_at(max(last, 0)), self._start_frame)
        return SpeechEnd(session=self.sid, start_frame=self._start_frame, end_frame=end_frame, silence_ms=silence / _MS)

    def _voiced_end_frame(self, now: int) -> int:
        """The end frame `_end` would report if the utterance ended now (same trimming and pad)."""
        assert self._silence_start is not None
        last = min(self._trimmed_end(self._silence_start) + self._pad, now) - 1
        return max(self._seq_at(max(last, 0)), self._start_frame)

    def _trimmed_end(self, end: int) -> int:
        """`end` pulled back over the quiet frames just before it (see EndpointConfig.end_trim_db)."""
        if self.config.end_trim_db is None or self._speech_start is None:
            return end
        floor = self._peak_db - self.config.end_trim_db
        limit = max(end - self._trim_max, self._speech_start)
        trimmed = end
        for _, first, db in reversed(self._frames):
            if first >= trimmed:
                continue
            if first < limit or db >= floor:
                break
            trimmed = first
        return trimmed

    def _seq_at(self, sample: int) -> int:
        for seq, first, _ in reversed(self._frames):
            if first <= sample:
                return seq
        return self._frames[0][0]

    def _trim(self) -> None:
        keep_from = self._scored - self._lookback
        if self._candidate is not None:
            keep_from = min(keep_from, self._candidate - self._pad)
        while len(self._frames) > 1 and self._frames[1][1] <= keep_from:
            self._frames.popleft()


_SILENT_FRAME = bytes(FRAME_BYTES)
_BYTES = (bytes, bytearray, memoryview)
_SCALE = np.float32(1 / 32768)


def _to_float(pcm: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) * _SCALE


def _dbfs(samples: np.ndarray) -> float:
    power = float(np.dot(samples, samples)) / max(len(samples), 1)
    return 10.0 * float(np.log10(power + 1e-20))


def _dbfs_rows(rows: np.ndarray) -> list[float]:
    """`_dbfs` of every row of a 2-D float32 array, in one pass."""
    power = np.einsum("ij,ij->i", rows, rows) / max(rows.shape[1], 1)
    levels: list[float] = (10.0 * np.log10(power.astype(np.float64) + 1e-20)).tolist()
    return levels


class BatchVad:
    """Every session of a bridge: `process()` scores all ready windows in one engine call per round.

    Not thread-safe: one task pushes frames and calls `process()` once per tick (in a
    thread when the loop must not block on inference).
    """

    def __init__(self, engine: VadEngine, config: EndpointConfig | None = None, **overrides: Any) -> None:
        if config is not None and overrides:
            raise ValueError("pass either config or keyword overrides, not both")
        self.engine = engine
        self.config = config or EndpointConfig(**overrides)
        self._sessions: dict[str, SpeechSegmenter] = {}
        self._states: dict[str, Any] = {}

    def __contains__(self, sid: object) -> bool:
        return sid in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, sid: str) -> None:
        if sid in self._sessions:
            raise ValueError(f"VAD session {sid!r} already added")
        self._sessions[sid] = SpeechSegmenter(sid, self.config, self.engine.window_samples)
        self._states[sid] = self.engine.new_state()

    def remove(self, sid: str) -> SpeechEnd | None:
        """Forget a session; returns the SpeechEnd of an utterance it was still in, if any."""
        self._states.pop(sid, None)
        segmenter = self._sessions.pop(sid, None)
        return segmenter.close() if segmenter else None

    def in_speech(self, sid: str) -> bool:
        return self._get(sid).in_speech

    def push(self, sid: str, seq: int, pcm: bytes, rate: int = SAMPLE_RATE) -> None:
        """Queue one 20 ms frame; ValueError for an unknown session or a bad frame."""
        self._get(sid).push(seq, pcm, rate)

    def feed(
        self, frames: Iterable[tuple[str, list[tuple[int, bytes, Any]]]]
    ) -> tuple[list[tuple[str, VadEvent]], list[tuple[str, int, str]]]:
        """Push every session's new frames ((seq, pcm, anything) each), then `process()`.

        Returns the events and the frames refused, as (sid, seq, reason): a bad frame
        costs only itself. The frames' levels are measured in one pass over all of them."""
        flat = [(sid, seq, pcm) for sid, items in frames for seq, pcm, _ in items]
        blob = b"".join(pcm if isinstance(pcm, _BYTES) and len(pcm) == FRAME_BYTES else _SILENT_FRAME for _, _, pcm in flat)
        levels = _dbfs_rows(_to_float(blob).reshape(len(flat), FRAME_SAMPLES)) if flat else []
        rejected: list[tuple[str, int, str]] = []
        for (sid, seq, pcm), level in zip(flat, levels):
            try:
                segmenter = self._get(sid)
                segmenter.check(seq, pcm)
            except ValueError as exc:
                rejected.append((sid, seq, str(exc)))
                continue
            segmenter.append(seq, pcm, level)
        return self.process(), rejected

    def process(self) -> list[tuple[str, VadEvent]]:
        """Score every complete window of every session (one batched call per round) and
        return the events decided, in order per session."""
        events: list[tuple[str, VadEvent]] = []
        while True:
            ready = [(sid, seg) for sid, seg in self._sessions.items() if seg.pending_samples >= seg.window]
            if not ready:
                return events
            windows = _to_float(b"".join([seg.window_bytes() for _, seg in ready])).reshape(len(ready), -1)
            level = dict(zip([sid for sid, _ in ready], _dbfs_rows(windows)))
            for (sid, seg), prob, state in self._score(ready, windows):
                self._states[sid] = state
                events.extend((sid, event) for event in seg.advance(prob, level[sid]))

    def _score(
        self, ready: list[tuple[str, SpeechSegmenter]], windows: np.ndarray
    ) -> Iterable[tuple[tuple[str, SpeechSegmenter], float, Any]]:
        try:
            probs, states = self.engine.score(windows, [self._states[sid] for sid, _ in ready])
            return zip(ready, probs.tolist(), states)
        except Exception:
            log.exception("batched VAD call over %d sessions failed; scoring them one by one", len(ready))
        scored = []
        for i, item in enumerate(ready):
            sid = item[0]
            try:
                probs, states = self.engine.score(windows[i : i + 1], [self._states[sid]])
                scored.append((item, float(probs[0]), states[0]))
            except Exception:
                log.exception("VAD failed for session %s: session dropped", sid)
                self._sessions.pop(sid, None)
                self._states.pop(sid, None)
        return scored

    def _get(self, sid: str) -> SpeechSegmenter:
        segmenter = self._sessions.get(sid)
        if segmenter is None:
            raise ValueError(f"unknown VAD session {sid!r}: add() it first (or it was dropped after a failure)")
        return segmenter
