"""Joins between the audio of consecutive TTS pieces: no gap, no click.

An engine pads every piece it synthesizes with its own silence (measured
with the bundled voices: Piper ~35-60 ms before and 120-300 ms after a
piece, Kokoro ~30 ms / 60-100 ms), so pieces played back to back leave
holes of 150-350 ms in the middle of a sentence. `PieceShaper` shapes each
piece as it streams out of the engine:

- its leading silence (below `threshold_dbfs`) is cut to `edge_ms`, and so is
  its trailing silence;
- its first and last `fade_ms` are faded in and out (raised cosine), so every
  piece starts and ends at zero and two pieces join without a step;
- the pause its text calls for goes before the next piece: `clause_pause_ms`
  after , ; : an ellipsis or a dash, `sentence_pause_ms` after a sentence
  (kokoro-onnx joins its own batches with 100 and 250 ms), none after a cut
  between words, and none after the reply's last piece.

Streaming: a piece's first audio goes out as soon as the engine yields it;
only the quiet tail of the latest engine chunk (at least `fade_ms`) is held
back until it is known whether the piece ends there. `edge_ms` < 0 turns all
of this off (the engine's own silences, as before). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from .clauses import pause_after

_EMPTY = np.zeros(0, dtype=np.int16)


def raised_cosine(n: int) -> np.ndarray:
    """n gains rising from exactly 0 towards 1 (a fade-in; reversed, a fade-out ending at exactly 0)."""
    k = np.arange(n, dtype=np.float64)
    gains: np.ndarray = 0.5 - 0.5 * np.cos(np.pi * k / max(n, 1))
    return gains


def level(dbfs: float) -> float:
    """The int16 amplitude of a dBFS level."""
    return float(32768.0 * 10 ** (dbfs / 20))


class PieceShaper:
    """Shapes the audio of one job's pieces, one piece at a time: `begin`, `push`..., `end`."""

    def __init__(self, rate: int, *, edge_ms: float = 5.0, fade_ms: float = 2.0, clause_pause_ms: float = 100.0,
                 sentence_pause_ms: float = 250.0, threshold_dbfs: float = -45.0) -> None:
        self.rate = rate
        self.enabled = edge_ms >= 0
        self.edge = _samples(rate, max(edge_ms, 0.0))
        self.fade = _samples(rate, fade_ms)
        self.pauses = {"clause": _samples(rate, clause_pause_ms), "sentence": _samples(rate, sentence_pause_ms)}
        self.threshold = level(threshold_dbfs)
        self._ramp = raised_cosine(self.fade)
        self._started = False
        self._lead = _EMPTY  # quiet samples seen before the piece's first sound (at most `edge`)
        self._tail = _EMPTY  # held back: may be the piece's trailing silence

    def pause_ms(self, previous: str | None) -> float:
        """The pause after piece `previous` (None: nothing came before)."""
        kind = pause_after(previous) if self.enabled and previous else None
        return self.pauses[kind] * 1000 / self.rate if kind else 0.0

    def begin(self, previous: str | None) -> np.ndarray:
        """The silence to play before a piece, given the text of the piece before it (None: it is the first)."""
        self._started, self._lead, self._tail = False, _EMPTY, _EMPTY
        kind = pause_after(previous) if self.enabled and previous else None
        return np.zeros(self.pauses[kind] if kind else 0, dtype=np.int16)

    def push(self, audio: np.ndarray) -> np.ndarray:
        """An engine chunk of the piece (int16) -> the audio to send now (possibly empty)."""
        if not self.enabled:
            return audio
        x = np.asarray(audio, dtype=np.int16)
        if not self._started:
            loud = np.flatnonzero(np.abs(x.astype(np.int32)) > self.threshold)
            if not loud.size:
                self._lead = _keep_last(np.concatenate([self._lead, x]), self.edge)
                return _EMPTY
            onset = int(loud[0])
            x = np.concatenate([_keep_last(np.concatenate([self._lead, x[:onset]]), self.edge), x[onset:]])
            x = self._fade(x, fade_in=True)
            self._started, self._lead = True, _EMPTY
        elif self._tail.size:
            x = np.concatenate([self._tail, x])
        hold = min(self._last_loud(x) + 1, len(x) - self.fade)
        hold = max(hold, 0)
        self._tail = x[hold:]
        return x[:hold]

    def end(self) -> np.ndarray:
        """The piece is over: the rest of its audio, its trailing silence cut to `edge_ms` and faded out."""
        if not self.enabled or not self._started:
            self._started, self._lead, self._tail = False, _EMPTY, _EMPTY
            return _EMPTY
        tail = self._tail
        keep = self._last_loud(tail) + 1 + self.edge
        tail = tail[:keep] if keep <= len(tail) else np.concatenate([tail, np.zeros(keep - len(tail), np.int16)])
        self._started, self._tail = False, _EMPTY
        return self._fade(tail, fade_in=False)

    def _last_loud(self, x: np.ndarray) -> int:
        loud = np.flatnonzero(np.abs(x.astype(np.int32)) > self.threshold)
        return int(loud[-1]) if loud.size else -1

    def _fade(self, x: np.ndarray, *, fade_in: bool) -> np.ndarray:
        n = min(self.fade, len(x))
        if n == 0:
            return x
        out = x.copy()
        ramp = self._ramp[:n] if fade_in else self._ramp[:n][::-1]
        part = slice(0, n) if fade_in else slice(len(x) - n, len(x))
        out[part] = np.rint(x[part].astype(np.float64) * ramp).astype(np.int16)
        return out


def _samples(rate: int, ms: float) -> int:
    return int(round(rate * ms / 1000.0))


def _keep_last(x: np.ndarray, n: int) -> np.ndarray:
    return x[max(0, len(x) - n):] if n > 0 else _EMPTY
