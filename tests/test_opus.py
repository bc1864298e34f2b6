"""Caller audio in the streams as Opus (shared/opus.py, shared/caller_audio.py): real libopus
through PyAV, real speech. What a reader gets back must keep timing exactly (one 20 ms frame per
seq, silence where a frame is missing) and stay close to the input."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from shared import opus
from shared.caller_audio import to_pcm
from shared.protocol import FRAME_SAMPLES, AudioFrame, OpusFrame, decode, encode
from tests.engines.speech import synthesize_16k


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    pcm = synthesize_16k("Please call Stella and ask her to bring these things with her from the store.")
    return pcm[: len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES]


def frames_of(pcm: np.ndarray, sid: str = "s1", codec: str = "opus") -> list[AudioFrame | OpusFrame]:
    enc = opus.OpusEncoder()
    out: list[AudioFrame | OpusFrame] = []
    for seq, start in enumerate(range(0, len(pcm), FRAME_SAMPLES)):
        chunk = pcm[start:start + FRAME_SAMPLES]
        out.append(OpusFrame(session=sid, seq=seq, opus=enc.encode(chunk)) if codec == "opus"
                   else AudioFrame(session=sid, seq=seq, pcm=chunk.tobytes()))
    return out


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal to error ratio after the best small shift (the codec's resampling may delay a little)."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    best = -1e9
    for shift in range(-40, 41):
        a, b = (ref[shift:], got[: len(got) - shift]) if shift >= 0 else (ref[:shift], got[-shift:])
        err = np.sum((a - b) ** 2) + 1e-9
        best = max(best, 10 * np.log10(np.sum(a**2) / err))
    return best


def test_opus_frames_are_small_and_decode_to_the_same_length(speech: np.ndarray) -> None:
    frames = frames_of(speech)
    sizes = [len(encode(f)) for f in frames]
    pcm_sizes = [len(encode(f)) for f in frames_of(speech, codec="pcm")]
    assert sum(pcm_sizes) / sum(sizes) > 5, (sum(pcm_sizes), sum(sizes))
    out = to_pcm(frames)
    assert out.dtype == np.int16 and len(out) == len(speech)
    assert snr_db(speech, out) > 3.0  # a perceptual codec: waveform-close, not identical (ASR WER: README)


def test_a_range_from_mid_call_uses_preroll_and_keeps_timing(speech: np.ndarray) -> None:
    frames = frames_of(speech)
    whole = to_pcm(frames)
    first, last = 40, 90
    part = to_pcm(frames[first - opus.PREROLL: last + 1], first, last)
    assert len(part) == (last - first + 1) * FRAME_SAMPLES
    ref = whole[first * FRAME_SAMPLES:(last + 1) * FRAME_SAMPLES]
    assert snr_db(ref, part) > 10.0  # warm decoder: the same as decoding the whole call


def test_missing_and_corrupt_frames_become_silence_of_their_length(speech: np.ndarray) -> None:
    frames = frames_of(speech)
    kept = [f for f in frames if f.seq not in (10, 11, 12)]
    out = to_pcm(kept, 0, frames[-1].seq)
    assert len(out) == len(speech)
    assert not out[11 * FRAME_SAMPLES:12 * FRAME_SAMPLES].any()  # inside the gap
    garbled = [OpusFrame(session="s1", seq=f.seq, opus=b"\xff\x00garbage") if f.seq == 20 else f for f in frames]
    assert len(to_pcm(garbled)) == len(speech)


def test_old_pcm_recordings_and_mixed_runs_still_read(speech: np.ndarray) -> None:
    pcm_frames = frames_of(speech, codec="pcm")
    assert np.array_equal(to_pcm(pcm_frames), speech)
    mixed = pcm_frames[:30] + frames_of(speech)[30:]
    out = to_pcm(mixed)
    assert len(out) == len(speech) and np.array_equal(out[: 30 * FRAME_SAMPLES], speech[: 30 * FRAME_SAMPLES])


def test_the_wire_rejects_what_is_no_opus_packet() -> None:
    frame = OpusFrame(session="s1", seq=3, opus=b"\x08" * 30)
    assert decode(encode(frame)) == frame
    with pytest.raises(ValueError):
        OpusFrame(session="s1", seq=3, opus=b"")
    with pytest.raises(ValueError):
        OpusFrame(session="s1", seq=3, opus=b"\0" * 2000)
    with pytest.raises(ValueError):
        opus.OpusEncoder().encode(np.zeros(100, dtype=np.int16))


def test_the_native_encoder_is_used_and_decodes_like_pyavs(speech: np.ndarray) -> None:
    """The bridge's encoder calls libopus directly (shared/opus_native.py); its packets must decode
    to the same audio, with the same alignment, as PyAV's encoder of the same libopus settings."""
    from shared.opus_native import NativeOpusEncoder

    assert NativeOpusEncoder.available(), "libopus should load (the system's or PyAV's bundled copy)"
    native, via_av = opus.OpusEncoder(), opus.OpusEncoder(native=False)
    assert native._native is not None and via_av._native is None
    chunks = [speech[i:i + FRAME_SAMPLES] for i in range(0, len(speech), FRAME_SAMPLES)]
    a = [native.encode(c) for c in chunks]
    b = [via_av.encode(c) for c in chunks]
    assert 0.8 < sum(map(len, a)) / sum(map(len, b)) < 1.25  # the same bitrate
    pcm_a, pcm_b = opus.decode(a), opus.decode(b)
    assert len(pcm_a) == len(pcm_b) == len(speech)
    assert snr_db(speech, pcm_a) > 3.0 and snr_db(pcm_b, pcm_a) > 10.0
    # alignment: the best shift between input and decoded audio is the same for both
    def lag(x: np.ndarray) -> int:
        ref = speech.astype(np.float64)
        return max(range(-40, 41), key=lambda s: float(np.dot(ref[max(s, 0):len(ref) + min(s, 0)],
                                                               x[max(-s, 0):len(x) - max(s, 0)].astype(np.float64))))
    assert lag(pcm_a) == lag(pcm_b)


def test_warm_up_runs_the_decoder_and_the_agent_encoder() -> None:
    """What a worker runs at load (workers/stages: asr, eot, tts) so its first job pays no import or codec set-up."""
    opus.warm_up()
    opus.warm_up(22_050)  # Piper's rate: the agent stream resamples to 24 kHz
    assert "av" in sys.modules
