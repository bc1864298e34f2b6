"""Seams in what the caller heard: the silence and the click at each join between two TTS pieces.

`voxbus demo` records the agent audio the caller received (reply.wav, 48 kHz).
The bridge knows where each piece (clause) starts in a turn's audio and where
its playout ran dry (`Playout.turn_stats`); `locate_joins` maps those places
into the recording, lined up on the turn's first sound (the -40 dBFS onset the
bridge noted, found again in the recording: Opus and the network delay move
it, the frame clock does not). `check_turn` then measures each join:

- `silence_ms`: the run of silence (every 1 ms window below -50 dBFS) at the
  join, ±5 ms. The TTS trims at -45 dBFS; 5 dB lower here, a quiet decay that
  Opus leaves a little quieter still counts as sound, not as gap. `gap_ms` is what it exceeds the pause the text asks for there
  (`pause_ms`: after a comma or a sentence end); over `MAX_GAP_MS` fails.
  `underrun_ms` is the part of it the playout sent because the next piece was
  not there yet (the engine slower than real time); `seam_gap_ms`, the rest,
  is what the join itself adds.
- `click`: the largest |sample-to-sample difference| within 5 ms of the join
  and of the edges of its silence, over the 99th percentile of |difference|
  across the turn's sound. A step in the waveform (a piece cut off mid-wave, a
  frame of silence dropped into speech) scores far above speech, whose
  loudest transients stay near 1-2; over `MAX_CLICK` fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .playout import ONSET_LEVEL, Underrun

SILENCE_DBFS = -50.0
MAX_GAP_MS = 30.0
MAX_CLICK = 4.0
WINDOW_MS = 1.0
NEAR_MS = 5.0


@dataclass(frozen=True, slots=True)
class Seam:
    at: int  # sample of the recording where the later piece starts
    silence_ms: float
    pause_ms: float  # the pause the text asks for here
    click: float
    underrun_ms: float = 0.0  # silence the playout sent here, waiting for the piece

    @property
    def gap_ms(self) -> float:
        return max(0.0, self.silence_ms - self.pause_ms)

    @property
    def seam_gap_ms(self) -> float:
        return max(0.0, self.gap_ms - self.underrun_ms)

    @property
    def ok(self) -> bool:
        return self.gap_ms <= MAX_GAP_MS and self.click <= MAX_CLICK

    @property
    def seam_ok(self) -> bool:
        """The join itself is clean (an underrun aside)."""
        return self.seam_gap_ms <= MAX_GAP_MS and self.click <= MAX_CLICK

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "silence_ms": self.silence_ms, "pause_ms": self.pause_ms,
                "gap_ms": round(self.gap_ms, 1), "underrun_ms": self.underrun_ms,
                "seam_gap_ms": round(self.seam_gap_ms, 1), "click": self.click, "ok": self.ok}


def find_onset(x: np.ndarray, start: int = 0, level: int = ONSET_LEVEL) -> int | None:
    """The first sample at or after `start` at or above `level`."""
    loud = np.flatnonzero(np.abs(x[max(start, 0):].astype(np.int32)) >= level)
    return int(loud[0]) + max(start, 0) if loud.size else None


def locate_joins(turn_start: int, clause_starts: list[int], underruns: list[Underrun],
                 frame_samples: int = 960) -> list[int]:
    """Where each piece after the first starts in the recording: its place in the turn's audio, pushed
    back by the silent frames the playout sent before it."""
    joins = []
    for start in clause_starts[1:]:
        frame = start // frame_samples
        late = sum(u.frames for u in underruns if u.played <= frame)
        joins.append(turn_start + start + late * frame_samples)
    return joins


def join_underruns(clause_starts: list[int], underruns: list[Underrun], pauses_ms: list[float],
                   frame_samples: int = 960, frame_ms: float = 20.0) -> list[float]:
    """Silence the playout sent at each join (ms): underruns from the frame before the later piece
    starts to the end of the pause that opens it, with the padding of the frame before them."""
    out = []
    for start, pause in zip(clause_starts[1:], pauses_ms, strict=True):
        first = start // frame_samples - 1
        last = (start + int(pause * frame_samples / frame_ms)) // frame_samples + 1
        out.append(round(sum(u.frames * frame_ms + u.padded * frame_ms / frame_samples
                             for u in underruns if first <= u.played <= last), 1))
    return out


def silence_at(x: np.ndarray, at: int, rate: int) -> tuple[int, int]:
    """The run of quiet windows nearest `at` (within NEAR_MS) as (first, end) samples; (at, at) if none."""
    win = max(1, int(rate * WINDOW_MS / 1000))
    near = int(rate * NEAR_MS / 1000)
    first_win, last_win = max(0, (at - near) // win), min(len(x) // win, (at + near) // win + 1)
    if last_win <= first_win:
        return at, at
    quiet = _quiet(x, win)
    best = (at, at)
    i = first_win
    while i < last_win:
        if not quiet[i]:
            i += 1
            continue
        lo = i
        while lo > 0 and quiet[lo - 1]:
            lo -= 1
        hi = i
        while hi < len(quiet) and quiet[hi]:
            hi += 1
        if (hi - lo) * win > best[1] - best[0]:
            best = (lo * win, hi * win)
        i = hi
    return best


def click_score(x: np.ndarray, spans: list[tuple[int, int]], reference: float) -> float:
    """max |difference| over the spans, relative to `reference`."""
    diff = np.abs(np.diff(x.astype(np.int32)))
    peak = max((int(diff[max(a, 0):max(b, 0)].max(initial=0)) for a, b in spans), default=0)
    return peak / max(reference, 1.0)


def reference_diff(x: np.ndarray, rate: int) -> float:
    """99th percentile of |difference| over the sounding 1 ms windows of `x` (speech's own steepness)."""
    win = max(1, int(rate * WINDOW_MS / 1000))
    n = len(x) // win
    if n == 0:
        return 1.0
    loud = ~_quiet(x, win)
    diff = np.abs(np.diff(x[: n * win].astype(np.int32), append=0)).reshape(n, win)[loud]
    return float(np.percentile(diff, 99)) if diff.size else 1.0


def check_joins(x: np.ndarray, rate: int, joins: list[int], pauses_ms: list[float],
                reference: float | None = None, underrun_ms: list[float] | None = None) -> list[Seam]:
    """Measure each join of `x` (int16 mono at `rate`); `pauses_ms[i]` is the pause intended at joins[i]."""
    ref = reference if reference is not None else reference_diff(x, rate)
    near = int(rate * NEAR_MS / 1000)
    seams = []
    for i, (at, pause) in enumerate(zip(joins, pauses_ms, strict=True)):
        lo, hi = silence_at(x, at, rate)
        spans = [(at - near, at + near), (lo - near, lo + near), (hi - near, hi + near)]
        seams.append(Seam(at=at, silence_ms=round((hi - lo) * 1000 / rate, 1), pause_ms=pause,
                          click=round(click_score(x, spans, ref), 2),
                          underrun_ms=underrun_ms[i] if underrun_ms else 0.0))
    return seams


def check_turn(x: np.ndarray, rate: int, search_from: int, onset: int | None, clause_starts: list[int],
               underruns: list[Underrun], pauses_ms: list[float], end: int | None = None) -> list[Seam]:
    """The joins of one turn found in the recording `x`: the turn's onset is searched from `search_from`
    (a little before its first frame arrived); `end` bounds the turn's sound for the click reference."""
    if onset is None or len(clause_starts) < 2:
        return []
    heard = find_onset(x, search_from)
    if heard is None:
        raise ValueError("the turn's sound is not in the recording")
    start = heard - onset
    frame = rate // 50
    joins = locate_joins(start, clause_starts, underruns, frame_samples=frame)
    return check_joins(x, rate, joins, pauses_ms, reference_diff(x[start:end], rate),
                       join_underruns(clause_starts, underruns, pauses_ms, frame_samples=frame))


def summary(seams: list[Seam]) -> dict[str, Any]:
    """The figures `voxbus demo --json` prints per turn."""
    return {
        "joins": len(seams),
        "join_gap_ms": round(max((s.gap_ms for s in seams), default=0.0), 1),
        "join_seam_gap_ms": round(max((s.seam_gap_ms for s in seams), default=0.0), 1),
        "join_silence_ms": [s.silence_ms for s in seams],
        "join_click": max((s.click for s in seams), default=0.0),
        "seams_ok": all(s.ok for s in seams),
        "seams": [s.as_dict() for s in seams],
    }


def _quiet(x: np.ndarray, win: int) -> np.ndarray:
    n = len(x) // win
    peaks = np.abs(x[: n * win].astype(np.int32)).reshape(n, win).max(axis=1)
    quiet: np.ndarray = peaks < 32768.0 * 10 ** (SILENCE_DBFS / 20)
    return quiet
