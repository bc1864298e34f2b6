"""Audio of the streams back to PCM, whatever its encoding, for every reader (a worker's job range,
a replay, `voxbus inspect`): the caller's frames of audio.in (`AudioFrame` PCM in older
recordings, `OpusFrame`) and the agent's chunks of audio.out (`AudioOut` PCM, `OpusOut`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .protocol import FRAME_MS, FRAME_SAMPLES, AudioFrame, AudioOut, OpusFrame, OpusOut

CallerFrames = Sequence[AudioFrame | OpusFrame]


def to_pcm(frames: CallerFrames, first_seq: int | None = None, last_seq: int | None = None) -> np.ndarray:
    """Frames (one per seq, in seq order) as PCM16 covering [first_seq, last_seq] (default: the
    frames' own span). A missing frame is 20 ms of silence, so timing holds; frames before
    `first_seq` are decoded as Opus pre-roll and dropped."""
    if not frames:
        return np.zeros(0, dtype=np.int16)
    first = frames[0].seq if first_seq is None else first_seq
    last = frames[-1].seq if last_seq is None else last_seq
    if last < first:
        return np.zeros(0, dtype=np.int16)
    out = np.zeros((last - first + 1) * FRAME_SAMPLES, dtype=np.int16)
    # Runs of one encoding, each decoded in one go (an Opus run's decoder state carries across it).
    run: list[AudioFrame | OpusFrame] = []
    for frame in frames:
        if run and (type(frame) is not type(run[-1]) or frame.seq <= run[-1].seq):
            _place(run, first, last, out)
            run = []
        run.append(frame)
    _place(run, first, last, out)
    return out


def _place(run: list[AudioFrame | OpusFrame], first: int, last: int, out: np.ndarray) -> None:
    if not run:
        return
    base = run[0].seq
    span = run[-1].seq - base + 1
    if isinstance(run[0], OpusFrame):
        from . import opus

        packets: list[bytes | None] = [None] * span
        for f in run:
            if isinstance(f, OpusFrame):
                packets[f.seq - base] = f.opus
        pcm = opus.decode(packets)
    else:
        pcm = np.zeros(span * FRAME_SAMPLES, dtype=np.int16)
        for f in run:
            if isinstance(f, AudioFrame):
                samples = np.frombuffer(f.pcm, dtype=np.int16)[:FRAME_SAMPLES]
                at = (f.seq - base) * FRAME_SAMPLES
                pcm[at:at + samples.size] = samples
    lo, hi = max(base, first), min(run[-1].seq, last)
    if lo > hi:
        return
    out[(lo - first) * FRAME_SAMPLES:(hi - first + 1) * FRAME_SAMPLES] = \
        pcm[(lo - base) * FRAME_SAMPLES:(hi - base + 1) * FRAME_SAMPLES]


def agent_seconds(chunk: AudioOut | OpusOut) -> float:
    """How much agent speech one audio.out chunk carries."""
    if isinstance(chunk, OpusOut):
        return len(chunk.packets) * FRAME_MS / 1000
    return len(chunk.pcm) / 2 / chunk.rate


def agent_pcm(chunks: Sequence[AudioOut | OpusOut]) -> tuple[int, np.ndarray]:
    """One turn's agent speech (its chunks in seq order) as (rate, PCM16): Opus decodes at 48 kHz."""
    from . import opus

    if any(isinstance(c, OpusOut) for c in chunks):
        return opus.OpusStreamDecoder.rate, opus.decode_stream([p for c in chunks if isinstance(c, OpusOut) for p in c.packets])
    pcm = b"".join(c.pcm for c in chunks if isinstance(c, AudioOut))
    rate = next((c.rate for c in chunks if isinstance(c, AudioOut)), opus.OpusStreamDecoder.rate)
    return rate, np.frombuffer(pcm, dtype="<i2").astype(np.int16)
