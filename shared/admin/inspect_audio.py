"""`voxbus inspect`, the sound: the call's two tracks, their waveforms and each turn's audio as Opus.

Both tracks are 16 kHz PCM16 on the timeline's clock (sample 0 = caller frame 0):
the caller as the bridge received them, and the agent as the caller heard it
(each played turn's TTS audio from its playout start, cut where a barge-in
flushed it). Waveforms are min/max peaks per pixel column; a turn's audio is
the two tracks mixed, encoded with Opus (PyAV, WebM) for a data: URI.
"""

from __future__ import annotations

import base64
import io
import statistics
from dataclasses import dataclass

import numpy as np

from ..caller_audio import agent_pcm, to_pcm
from ..protocol import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, AudioOut, OpusFrame, OpusOut
from .inspect_model import Timeline, TurnRow
from .recording import Recording

RATE = SAMPLE_RATE
OPUS_BITRATE = 16_000  # mono speech: about 60 KiB a minute with WebM's overhead at 60 ms frames
OPUS_FRAME_MS = "60"  # fewer, larger packets: WebM's per-block overhead is a quarter of 16 kbit/s at 20 ms
AUDIO_MIME = "audio/webm"


@dataclass(frozen=True, slots=True)
class CallerAudio:
    origin: float | None  # wall clock of sample 0 (frame 0); None: no caller audio
    pcm: np.ndarray  # 16 kHz PCM16, frame `seq` at sample seq * FRAME_SAMPLES
    realtime: bool  # frames arrived at the pace they were spoken (not a fast replay)
    missing: str = ""  # why the audio could not be decoded ("": it was)


def caller_pcm(rec: Recording) -> CallerAudio:
    """The caller's audio as one 16 kHz PCM16 track, and the wall clock of its sample 0 (frame 0).

    The one place the report reads caller audio (PCM or Opus frames, through `shared.caller_audio`).
    Frames sit at their sequence number (a lost one stays silent); the clock is the median of the
    frames' own capture times, so batching jitter in any one timestamp does not move the track.
    """
    frames = sorted((m for m in rec.messages("audio.in") if isinstance(m, AudioFrame | OpusFrame)), key=lambda f: f.seq)
    if not frames:
        return CallerAudio(None, np.zeros(0, dtype=np.int16), True)
    origin = statistics.median(f.ts - f.seq * FRAME_SAMPLES / RATE for f in frames)
    first, last = frames[0], frames[-1]
    spoken_s = (last.seq - first.seq) * FRAME_SAMPLES / RATE
    realtime = spoken_s < 5 or (last.ts - first.ts) >= 0.9 * spoken_s
    try:
        return CallerAudio(origin, to_pcm(frames, 0, last.seq), realtime)
    except ImportError:  # Opus frames need PyAV: the timeline still stands without the sound
        return CallerAudio(origin, np.zeros((last.seq + 1) * FRAME_SAMPLES, dtype=np.int16), realtime,
                           "The caller's audio is Opus and PyAV (the webrtc extra) is not installed: no caller waveform.")


def resample(pcm: np.ndarray, rate: int, to: int = RATE) -> np.ndarray:
    """Band-limited resampling (FFT) of one turn's agent audio: TTS voices run at 22.05 or 24 kHz."""
    if rate == to or len(pcm) == 0:
        return pcm.astype(np.int16)
    n = max(1, round(len(pcm) * to / rate))
    spectrum = np.fft.rfft(pcm.astype(np.float64))[: n // 2 + 1]
    out = np.fft.irfft(spectrum, n) * (n / len(pcm))
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def agent_track(rec: Recording, tl: Timeline, length: int) -> np.ndarray:
    """The agent as the caller heard it: each played turn from its playout start, `heard_ms` of it."""
    chunks: dict[int, list[AudioOut | OpusOut]] = {}
    for m in rec.messages("audio.out"):
        if isinstance(m, AudioOut | OpusOut) and m.turn in tl.playouts:
            chunks.setdefault(m.turn, []).append(m)
    mix = np.zeros(length, dtype=np.int32)
    for turn, parts in chunks.items():
        play = tl.playouts[turn]
        parts.sort(key=lambda m: m.seq)
        rate, raw = agent_pcm(parts)
        pcm = resample(raw, rate)
        if play.heard_ms is not None:
            pcm = pcm[: int(play.heard_ms / 1000 * RATE)]
        at = int(round(play.start * RATE))
        lo, hi = max(0, at), min(length, at + len(pcm))
        if hi > lo:
            mix[lo:hi] += pcm[lo - at: hi - at]
    return np.clip(mix, -32768, 32767).astype(np.int16)


@dataclass(frozen=True, slots=True)
class Tracks:
    caller: np.ndarray
    agent: np.ndarray
    caller_scale: float
    agent_scale: float

    def window(self, track: np.ndarray, t0: float, t1: float) -> np.ndarray:
        """Samples of [t0, t1) (seconds on the timeline), zeros outside the recording."""
        s0, s1 = int(round(t0 * RATE)), int(round(t1 * RATE))
        out = np.zeros(max(0, s1 - s0), dtype=np.int16)
        lo, hi = max(0, s0), min(len(track), s1)
        if hi > lo:
            out[lo - s0: hi - s0] = track[lo:hi]
        return out


def tracks(rec: Recording, tl: Timeline, caller: np.ndarray) -> Tracks:
    length = max(len(caller), int(np.ceil(tl.duration * RATE)))
    padded = np.zeros(length, dtype=np.int16)
    padded[: len(caller)] = caller
    agent = agent_track(rec, tl, length)
    return Tracks(padded, agent, _scale(padded), _scale(agent))


def _scale(track: np.ndarray) -> float:
    """Full scale of a waveform: a near-maximum, so one click does not flatten the speech."""
    if not len(track):
        return 1.0
    return max(1.0, float(np.percentile(np.abs(track.astype(np.int32)), 99.9)))


def peaks(pcm: np.ndarray, columns: int, scale: float) -> bytes:
    """Min and max of each pixel column, as int8 pairs scaled to `scale`."""
    columns = max(1, min(columns, len(pcm)))
    per = len(pcm) // columns
    if per == 0:
        return bytes(2 * columns)
    blocks = pcm[: per * columns].astype(np.float64).reshape(columns, per)
    pairs = np.stack([blocks.min(axis=1), blocks.max(axis=1)], axis=1) / scale * 127
    return bytes(np.clip(np.round(pairs), -127, 127).astype(np.int8).tobytes())


def encode_opus(pcm: np.ndarray, rate: int = RATE, bitrate: int = OPUS_BITRATE) -> bytes:
    """Mono PCM16 as Opus in WebM (PyAV). Raises ImportError without PyAV (the webrtc extra)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono",
                                options={"application": "voip", "frame_duration": OPUS_FRAME_MS})
        stream.bit_rate = bitrate
        step = rate // 10
        for at in range(0, len(pcm), step):
            frame = av.AudioFrame.from_ndarray(pcm[at: at + step].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = at
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = AUDIO_MIME) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@dataclass(frozen=True, slots=True)
class RowMedia:
    caller_peaks: bytes
    agent_peaks: bytes
    audio: bytes | None  # the turn's mix as Opus/WebM (None: PyAV is not installed)


def row_media(tr: Tracks, row: TurnRow, columns: int, with_audio: bool = True) -> RowMedia:
    caller, agent = tr.window(tr.caller, row.t0, row.t1), tr.window(tr.agent, row.t0, row.t1)
    audio = None
    if with_audio:
        mixed = np.clip(caller.astype(np.int32) + agent.astype(np.int32), -32768, 32767).astype(np.int16)
        audio = encode_opus(mixed)
    return RowMedia(peaks(caller, columns, tr.caller_scale), peaks(agent, columns, tr.agent_scale), audio)


def has_opus() -> bool:
    try:
        import av
    except ImportError:
        return False
    return "libopus" in av.codecs_available
