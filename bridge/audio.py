"""Audio plumbing for the bridge: streaming resampling and fixed-size framing.

Integer down-sampling (48 kHz WebRTC audio to the 16 kHz the bridge works in)
takes a NumPy polyphase FIR path: it runs once per caller frame for every
session, and libswresample through PyAV costs ~35 us a call in Python object
churn (frames in, a list of frames out, arrays back), more than the filtering.
The FIR is designed like libswresample's default (Kaiser-windowed sinc, 32
taps per output phase, cutoff at 0.97 of the output Nyquist, beta 9). Every
other ratio goes through libswresample.
"""

from __future__ import annotations

from typing import Any

import av
import numpy as np
from numpy.lib.stride_tricks import as_strided

_EMPTY = np.zeros(0, dtype=np.int16)
_clip: Any = getattr(np, "_core", None) or np.core  # NumPy 2 / 1
_clip = _clip.umath.clip


class Resampler:
    """Streaming int16 resampler to mono; keeps state between calls."""

    def __init__(self, in_rate: int, out_rate: int, in_channels: int = 1) -> None:
        self.in_rate, self.out_rate, self.in_channels = in_rate, out_rate, in_channels
        self._layout = "mono" if in_channels == 1 else "stereo"
        self._fir: _Decimator | None = None
        self._r: av.AudioResampler | None = None
        if in_rate > out_rate and in_rate % out_rate == 0 and in_channels in (1, 2):
            self._fir = _Decimator(in_rate // out_rate, in_channels)
        else:
            self._r = av.AudioResampler(format="s16", layout="mono", rate=out_rate)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """`pcm`: int16 samples (interleaved if stereo). Returns mono int16 at out_rate."""
        if self._fir is not None:
            return self._fir.push(pcm)
        if self.in_rate == self.out_rate and self.in_channels == 1:
            return pcm.astype(np.int16, copy=False)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1).astype(np.int16, copy=False), format="s16", layout=self._layout)
        frame.sample_rate = self.in_rate
        assert self._r is not None
        return self._concat(self._r.resample(frame))

    def flush(self) -> np.ndarray:
        if self._fir is not None:
            return self._fir.flush()
        assert self._r is not None
        return self._concat(self._r.resample(None))

    @staticmethod
    def _concat(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16, copy=False)


def _lowpass(factor: int, taps_per_phase: int = 32, cutoff: float = 0.97, beta: float = 9.0) -> np.ndarray:
    """Kaiser-windowed sinc for decimation by `factor`, unity gain at DC, float32."""
    n_taps = taps_per_phase * factor
    fc = cutoff / (2 * factor)  # cycles per input sample
    t = np.arange(n_taps) - (n_taps - 1) / 2
    h = 2 * fc * np.sinc(2 * fc * t) * np.kaiser(n_taps, beta)
    taps: np.ndarray = (h / h.sum()).astype(np.float32)
    return taps


class _Decimator:
    """Polyphase FIR decimation by an integer factor, mono or interleaved stereo in, mono out.

    Input samples accumulate in one float32 buffer that also holds the filter's
    history; each call computes every output whose window is complete as one
    matrix-vector product over a strided view of that buffer (cached: a
    caller's frames are all the same size), then moves the tail to the front.
    """

    def __init__(self, factor: int, channels: int) -> None:
        self.factor, self.channels = factor, channels
        taps = _lowpass(factor)[::-1].copy()  # as a correlation over the window
        self._taps = taps * np.float32(0.5) if channels == 2 else taps  # stereo: the two channels are summed
        self._k = len(taps)
        self._buf = np.zeros(self._k - 1 + 4096, dtype=np.float32)
        self._have = self._k - 1  # zero history: the stream starts from silence
        self._views: dict[int, np.ndarray] = {}

    def push(self, pcm: np.ndarray) -> np.ndarray:
        have, buf = self._have, self._buf
        end = have + pcm.size // self.channels
        if end > len(buf):
            buf = self._grow(end)
        if self.channels == 2:
            pairs = pcm.reshape(-1, 2)
            np.add(pairs[:, 0], pairs[:, 1], out=buf[have:end], dtype=np.float32)
        else:
            buf[have:end] = pcm
        n_out = (end - self._k) // self.factor + 1
        if n_out <= 0:
            self._have = end
            return _EMPTY
        view = self._views.get(n_out)
        if view is None:
            view = self._views[n_out] = as_strided(buf, (n_out, self._k), (self.factor * 4, 4), writeable=False)
        out = np.dot(view, self._taps)  # np.dot, not @: @ copies the strided view first
        consumed = n_out * self.factor
        buf[: end - consumed] = buf[consumed:end]
        self._have = end - consumed
        np.rint(out, out=out)
        _clip(out, -32768.0, 32767.0, out=out)  # the ufunc: np.clip's Python wrapper costs more than the clipping
        result: np.ndarray = out.astype(np.int16)
        return result

    def flush(self) -> np.ndarray:
        """The samples still inside the filter (its group delay), pushed out with silence."""
        tail = self.push(np.zeros(self._k // 2 * self.channels, dtype=np.int16))
        self._buf[:] = 0
        self._have = self._k - 1
        return tail

    def _grow(self, size: int) -> np.ndarray:
        grown = np.zeros(max(size, 2 * len(self._buf)), dtype=np.float32)
        grown[: self._have] = self._buf[: self._have]
        self._buf = grown
        self._views.clear()
        return grown


class Framer:
    """Cuts a stream of samples into frames of exactly `size` samples."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf = _EMPTY

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        if not self._buf.size and len(pcm) == self.size:  # the usual case: one whole frame in, no copy
            return [pcm]
        buf = np.concatenate([self._buf, pcm]) if self._buf.size else pcm
        n = len(buf) // self.size
        frames = [buf[i * self.size : (i + 1) * self.size] for i in range(n)]
        rest = len(buf) - n * self.size
        self._buf = buf[n * self.size :].copy() if rest else _EMPTY
        return frames

    def pad_rest(self) -> np.ndarray | None:
        """The leftover samples padded with silence to a full frame, or None."""
        if not self._buf.size:
            return None
        out = np.zeros(self.size, dtype=np.int16)
        out[: self._buf.size] = self._buf
        self._buf = _EMPTY
        return out

    def clear(self) -> None:
        self._buf = _EMPTY
