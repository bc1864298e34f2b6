"""Audio plumbing for the bridge: streaming resampling and fixed-size framing (PyAV)."""

from __future__ import annotations

import av
import numpy as np


class Resampler:
    """Streaming mono int16 resampler (libswresample through PyAV); keeps state between calls."""

    def __init__(self, in_rate: int, out_rate: int, in_channels: int = 1) -> None:
        self.in_rate, self.out_rate, self.in_channels = in_rate, out_rate, in_channels
        self._layout = "mono" if in_channels == 1 else "stereo"
        self._r = av.AudioResampler(format="s16", layout="mono", rate=out_rate)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """`pcm`: int16 samples (interleaved if stereo). Returns mono int16 at out_rate."""
        if self.in_rate == self.out_rate and self.in_channels == 1:
            return pcm.astype(np.int16, copy=False)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1).astype(np.int16, copy=False), format="s16", layout=self._layout)
        frame.sample_rate = self.in_rate
        return self._concat(self._r.resample(frame))

    def flush(self) -> np.ndarray:
        return self._concat(self._r.resample(None))

    @staticmethod
    def _concat(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16, copy=False)


class Framer:
    """Cuts a stream of samples into frames of exactly `size` samples."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf = np.zeros(0, dtype=np.int16)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        buf = np.concatenate([self._buf, pcm]) if self._buf.size else pcm
        n = len(buf) // self.size
        frames = [buf[i * self.size : (i + 1) * self.size] for i in range(n)]
        self._buf = buf[n * self.size :].copy()
        return frames

    def pad_rest(self) -> np.ndarray | None:
        """The leftover samples padded with silence to a full frame, or None."""
        if not self._buf.size:
            return None
        out = np.zeros(self.size, dtype=np.int16)
        out[: self._buf.size] = self._buf
        self._buf = np.zeros(0, dtype=np.int16)
        return out

    def clear(self) -> None:
        self._buf = np.zeros(0, dtype=np.int16)
