"""Test speech: real Piper (joe voice) utterances at 16 kHz, padding, framing, word error rate.

Shared by the engine tests and ops/bench/stages.py. Synthesis runs with the
generator noise off, so a text always gives the same waveform, and is cached on
disk keyed by text: only the first run on a machine pays for Piper.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from shared.models import resolve
from shared.protocol import FRAME_SAMPLES, SAMPLE_RATE
from shared.wer import corpus_wer, normalize_words, wer, word_errors  # noqa: F401 (re-exported for the tests)

VOICE = "bundled:piper-joe-medium"
_CACHE_VERSION = "piper-joe-noise0-v1"  # change when synthesis settings change

_voice: Any = None
_voice_lock = threading.Lock()


def cache_dir() -> Path:
    """$VOXBUS_TEST_CACHE, else <tmp>/voxbus-test-speech."""
    root = Path(os.environ.get("VOXBUS_TEST_CACHE") or Path(tempfile.gettempdir()) / "voxbus-test-speech")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _piper_voice() -> Any:
    global _voice
    with _voice_lock:
        if _voice is None:
            from piper import PiperVoice

            _voice = PiperVoice.load(resolve(VOICE))
        return _voice


def resample_to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """int16 mono at `rate` -> int16 mono at 16 kHz (PyAV / libswresample, band-limited)."""
    import av

    samples = np.ascontiguousarray(audio, dtype=np.int16)
    if rate == SAMPLE_RATE or samples.size == 0:
        return samples.copy()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    out = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in out]).astype(np.int16)


def _synthesize_native(text: str) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    voice = _piper_voice()
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)  # deterministic waveform
    chunks = [chunk.audio_int16_array for chunk in voice.synthesize(text, config)]
    if not chunks:
        raise ValueError(f"Piper produced no audio for {text!r}")
    return np.concatenate(chunks), int(voice.config.sample_rate)


def synthesize_16k(text: str) -> np.ndarray:
    """`text` spoken by the Piper joe voice: int16 mono 16 kHz, cached on disk."""
    key = hashlib.sha256(f"{_CACHE_VERSION}\n{text}".encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.npy"
    if path.exists():
        return np.load(path)
    audio, rate = _synthesize_native(text)
    audio16 = resample_to_16k(audio, rate)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as out:
        np.save(out, audio16)
    os.replace(tmp, path)
    return audio16


def pad_silence(audio: np.ndarray, before_s: float = 1.0, after_s: float = 1.0) -> np.ndarray:
    """`audio` with digital silence before and after."""
    before = np.zeros(round(before_s * SAMPLE_RATE), dtype=audio.dtype)
    after = np.zeros(round(after_s * SAMPLE_RATE), dtype=audio.dtype)
    return np.concatenate([before, audio, after])


def speech_bounds(audio: np.ndarray, block_ms: float = 5.0, floor_db: float = -40.0) -> tuple[int, int]:
    """(first, last) sample of the blocks whose RMS is within `floor_db` of the loudest block."""
    block = max(1, round(block_ms * SAMPLE_RATE / 1000))
    n = len(audio) // block
    if n == 0:
        raise ValueError("audio shorter than one block")
    blocks = audio[: n * block].astype(np.float64).reshape(n, block)
    rms = np.sqrt((blocks**2).mean(axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (floor_db / 20))
    if rms.max() == 0 or loud.size == 0:
        raise ValueError("no speech in audio")
    return int(loud[0] * block), int((loud[-1] + 1) * block - 1)


def to_frames(audio: np.ndarray) -> list[bytes]:
    """20 ms PCM16 frames (the last one zero-padded), as the bridge publishes them."""
    samples = np.asarray(audio, dtype=np.int16)
    padded = np.concatenate([samples, np.zeros(-len(samples) % FRAME_SAMPLES, dtype=np.int16)])
    return [padded[i : i + FRAME_SAMPLES].astype("<i2").tobytes() for i in range(0, len(padded), FRAME_SAMPLES)]


def to_float32(audio: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1), what ASR engines take."""
    return (np.asarray(audio, dtype=np.int16).astype(np.float32)) / 32768.0


