"""Opus for the audio kept in Redis streams (PyAV's libopus).

The caller's audio is the bulk of every recording: as PCM16 it is 640 bytes a
20 ms frame, about 2 MB per call-minute in Redis. One Opus packet per frame
(16 kHz mono, VoIP mode) is about 40 bytes at 16 kbit/s: the entries shrink
about 6x with their envelope, and the ASR's word error rate on our test speech
does not move (README "Recording and replay").

Encoding runs on the bridge for every frame, so it uses libopus's cheapest
complexity (0): measured about 44 us a frame on the 2-core development machine
(libopus through ctypes, shared/opus_native.py; PyAV's path where it cannot load),
against several times that at the default complexity, for no WER difference
at this bitrate. Decoding happens where audio is read (a worker's job range, a
replay, a report): FFmpeg's Opus decoders always produce 48 kHz, resampled
back to 16 kHz in one call per range.

A range is decoded with the packets before it as pre-roll (`PREROLL`), so a
range read from the middle of a call starts with the decoder's state warm.

PyAV is imported on first use; a worker whose jobs read or write Opus calls `warm_up()` at load,
so its first job does not pay the import and the codecs' first use (~55 ms and ~35 ms here).
"""

from __future__ import annotations

import fractions
from collections.abc import Iterable
from typing import Any

import numpy as np

from .opus_native import NativeOpusEncoder

RATE = 16_000
FRAME_SAMPLES = 320  # 20 ms
BITRATE = 16_000
COMPLEXITY = 0
PREROLL = 8  # packets decoded and dropped before a range: SILK's state settles within ~160 ms (measured)
LOOKAHEAD_16K = 104  # libopus's encoder look-ahead (312 samples at 48 kHz) plus the resampler's delay
_DECODED_RATE = 48_000


class OpusEncoder:
    """One stream of 20 ms PCM16 frames (16 kHz mono) to one Opus packet each."""

    def __init__(self, bitrate: int = BITRATE, complexity: int = COMPLEXITY, *, native: bool = True) -> None:
        self._native = NativeOpusEncoder(RATE, FRAME_SAMPLES, bitrate, complexity) \
            if native and NativeOpusEncoder.available() else None
        self._encoder = self._native or _AvEncoder(RATE, bitrate, "voip", complexity)

    def encode(self, pcm: bytes | np.ndarray) -> bytes:
        """One frame (exactly 320 samples) to its packet."""
        samples = np.frombuffer(pcm, dtype=np.int16) if isinstance(pcm, bytes | bytearray) else pcm
        if samples.shape[-1] != FRAME_SAMPLES:
            raise ValueError(f"an Opus frame is {FRAME_SAMPLES} samples, got {samples.shape[-1]}")
        return self._encoder.encode(samples.reshape(-1))


def decode(packets: Iterable[bytes | None], drop: int = 0) -> np.ndarray:
    """Packets of one stream (None: a frame that is missing) to 16 kHz PCM16, one frame's length per
    packet, aligned with what was encoded, dropping the first `drop` frames (the pre-roll). A
    missing or corrupt packet decodes as 20 ms of silence. The encoder's look-ahead (6.5 ms) is
    taken off the start, so the last frame's final 6.5 ms are in the packet after it: without that
    packet they are silence (a job's range ends in the caller's silence anyway)."""
    dec = _AvDecoder()
    per_frame = _DECODED_RATE * FRAME_SAMPLES // RATE
    chunks: list[np.ndarray] = []
    for data in packets:
        out = dec.packet(data) if data else None
        chunks.append(np.zeros(per_frame, dtype=np.int16) if out is None else _fit(out, per_frame))
    n = len(chunks) - drop
    if n <= 0:
        return np.zeros(0, dtype=np.int16)
    # Resample with the pre-roll (the filter's start-up falls in it), then cut at the frame grid.
    pcm = _to_16k(np.concatenate(chunks))
    start = drop * FRAME_SAMPLES + LOOKAHEAD_16K
    return _fit(pcm[start:], n * FRAME_SAMPLES)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if x.size >= n else np.concatenate([x, np.zeros(n - x.size, dtype=x.dtype)])


def _to_16k(pcm48: np.ndarray) -> np.ndarray:
    if pcm48.size == 0:
        return pcm48.astype(np.int16)
    av = _av()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    frame = av.AudioFrame.from_ndarray(pcm48.reshape(1, -1).astype(np.int16), format="s16", layout="mono")
    frame.sample_rate = _DECODED_RATE
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    pcm = np.concatenate(out) if out else np.zeros(0, dtype=np.int16)
    return _fit(pcm, pcm48.size * RATE // _DECODED_RATE).astype(np.int16)


class _AvEncoder:
    """PyAV's libopus encoder of 20 ms mono PCM16 frames at `rate`: one packet per frame, which
    libopus returns at once (every packet decodes on its own)."""

    def __init__(self, rate: int, bitrate: int, application: str, complexity: int) -> None:
        self._av = _av()
        ctx = self._av.CodecContext.create("libopus", "w")
        ctx.sample_rate = rate
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.bit_rate = bitrate
        ctx.time_base = fractions.Fraction(1, rate)
        ctx.options = {"application": application, "compression_level": str(complexity), "frame_duration": "20"}
        self._ctx, self._rate, self._pts = ctx, rate, 0

    def encode(self, samples: np.ndarray) -> bytes:
        frame = self._av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._pts
        self._pts += samples.size
        return b"".join(bytes(p) for p in self._ctx.encode(frame))


class _AvDecoder:
    """PyAV's libopus decoder of one mono stream, at 48 kHz (what FFmpeg's decoders give)."""

    def __init__(self) -> None:
        self._av = _av()
        self._ctx = self._av.CodecContext.create("libopus", "r")
        self._ctx.sample_rate = _DECODED_RATE
        self._ctx.layout = "mono"

    def packet(self, data: bytes) -> np.ndarray | None:
        """One packet's PCM16 (empty while the decoder holds it), None for a corrupt packet."""
        try:
            frames = self._ctx.decode(self._av.Packet(data))
        except (self._av.error.FFmpegError, ValueError):
            return None
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16) if frames else \
            np.zeros(0, dtype=np.int16)


def _av() -> Any:
    import av

    return av


def warm_up(agent_rate: int | None = None) -> None:
    """Import PyAV and run the decoder (and, given the agent's sample rate, the agent-stream
    encoder) once, at a worker's load rather than in its first job."""
    enc = OpusEncoder()
    decode([enc.encode(np.zeros(FRAME_SAMPLES, dtype=np.int16)) for _ in range(3)])
    if agent_rate is not None:
        stream = OpusStreamEncoder(agent_rate)
        stream.encode(np.zeros(agent_rate // 10, dtype=np.int16))
        decode_stream(stream.flush())


OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)
AGENT_BITRATE = 32_000  # the agent's voice is what the caller hears: kept near transparent


class OpusStreamEncoder:
    """Agent speech in chunks of any length, at any rate, to 20 ms packets of one Opus stream.

    A rate Opus does not code (Piper's 22050 Hz) is resampled to the next one up (24 kHz).
    Samples that do not fill a packet wait for the next chunk: the bridge has the speech before
    them queued for playout, so holding under 20 ms costs nothing audible. `flush` pads the last
    packet with silence and pushes out the encoder's look-ahead."""

    def __init__(self, rate: int, bitrate: int = AGENT_BITRATE, complexity: int = 5) -> None:
        if not 0 < rate <= OPUS_RATES[-1]:
            raise ValueError(f"agent audio at {rate} Hz: Opus codes up to {OPUS_RATES[-1]} Hz")
        self.input_rate = rate
        self.rate = next(r for r in OPUS_RATES if r >= rate)
        self._av, self._encoder = _av(), _AvEncoder(self.rate, bitrate, "audio", complexity)
        self._resampler = (self._av.AudioResampler(format="s16", layout="mono", rate=self.rate)
                           if self.rate != rate else None)
        self.frame = self.rate // 50
        self._rest = np.zeros(0, dtype=np.int16)

    def encode(self, pcm: np.ndarray) -> list[bytes]:
        """Packets for the whole 20 ms frames now available."""
        pcm = self._resample(pcm.astype(np.int16, copy=False))
        buf = np.concatenate([self._rest, pcm]) if self._rest.size else pcm
        whole = buf.size // self.frame * self.frame
        self._rest = buf[whole:].copy()
        return [self._encoder.encode(buf[i:i + self.frame]) for i in range(0, whole, self.frame)]

    def flush(self) -> list[bytes]:
        """The rest, padded to a whole frame, then what the encoder still holds."""
        out: list[bytes] = []
        if self._resampler is not None:
            self._rest = np.concatenate([self._rest, self._resample(None)])
        if self._rest.size:
            out.append(self._encoder.encode(_fit(self._rest, self.frame)))
            self._rest = np.zeros(0, dtype=np.int16)
        out.append(self._encoder.encode(np.zeros(self.frame, dtype=np.int16)))  # carries the encoder's look-ahead out
        return out

    def _resample(self, pcm: np.ndarray | None) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.int16) if pcm is None else pcm
        frame = None
        if pcm is not None:
            if pcm.size == 0:
                return pcm
            frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.input_rate
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.int16) if out else np.zeros(0, dtype=np.int16)


class OpusStreamDecoder:
    """Packets of one stream to 48 kHz PCM16 (what FFmpeg's decoders give), the encoder's
    look-ahead taken off the start so the audio starts with the first sound."""

    rate = _DECODED_RATE

    def __init__(self) -> None:
        self._dec = _AvDecoder()
        self._skip = 312  # libopus's look-ahead at 48 kHz

    def decode(self, packet: bytes) -> np.ndarray:
        pcm = self._dec.packet(packet)
        if pcm is None:
            return np.zeros(_DECODED_RATE // 50, dtype=np.int16)  # a corrupt packet: its 20 ms as silence
        if self._skip:
            cut = min(self._skip, pcm.size)
            pcm, self._skip = pcm[cut:], self._skip - cut
        return pcm


def decode_stream(packets: Iterable[bytes]) -> np.ndarray:
    """A whole agent-audio stream (one turn's packets, in order) to 48 kHz PCM16."""
    dec = OpusStreamDecoder()
    chunks = [dec.decode(p) for p in packets]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
