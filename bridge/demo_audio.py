"""Audio for `voxbus demo`: reading and writing files, synthesized questions, pink noise.

Questions are synthesized once with the bundled Piper voice and cached in
`$VOXBUS_CACHE/demo/`. Pink noise (power falling 3 dB per octave, like room
and street noise) is mixed into the caller's microphone at a chosen
signal-to-noise ratio; the clean clip is kept, so the end of speech is known
exactly however loud the noise is.
"""

from __future__ import annotations

import hashlib
import sys
import wave
from pathlib import Path

import numpy as np

RATE = 16_000


def read_audio_16k(path: str | Path) -> np.ndarray:
    """Any audio file PyAV can decode, as 16 kHz mono int16."""
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise ValueError(f"{path}: no audio samples")
    return np.concatenate(chunks).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype(np.int16).tobytes())


def synthesize_16k(text: str, cache_name: str | None = None) -> np.ndarray:
    """A spoken utterance from the bundled Piper voice, cached after the first run."""
    from shared.models import cache_dir
    from workers import tts

    from .audio import Resampler

    name = cache_name or "say-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache_dir() / "demo" / f"{name}.wav"
    if path.exists():
        return read_audio_16k(path)
    print(f"voxbus: synthesizing the caller's words {text!r} (first run)", file=sys.stderr)
    engine = tts.create("piper", {"model": "bundled:piper-joe-medium"})
    engine.load()
    audio = np.concatenate([np.asarray(c, dtype=np.int16) for c in engine.synthesize(text)])
    down = Resampler(engine.sample_rate, RATE)
    pcm = np.concatenate([down.push(audio), down.flush()])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, pcm, RATE)
    return pcm


def with_silence(pcm: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    return np.concatenate([np.zeros(int(RATE * before_s), np.int16), pcm, np.zeros(int(RATE * after_s), np.int16)])


def speech_rms(pcm: np.ndarray, win: int = 160, floor_db: float = -45.0) -> float:
    """RMS of the voiced 10 ms windows of a clip (silence between words does not dilute it)."""
    n = len(pcm) // win
    x = pcm[: n * win].astype(np.float64).reshape(n, win) / 32768.0
    power = np.mean(x**2, axis=1)
    voiced = power[10 * np.log10(power + 1e-12) > floor_db]
    return float(np.sqrt(voiced.mean())) if voiced.size else 0.0


def pink_noise(seconds: float, rate: int, rms: float, seed: int = 7) -> np.ndarray:
    """Pink noise (1/f power) as int16 at the given RMS (full scale = 1.0), seeded: every run alike."""
    n = int(seconds * rate)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n)
    noise *= rms / (np.sqrt(np.mean(noise**2)) + 1e-12)
    return np.clip(noise * 32768.0, -32768, 32767).astype(np.int16)


def noise_for(snr_db: float, speech: list[np.ndarray], rate: int) -> np.ndarray:
    """A loop of pink noise `snr_db` below the speech level of `speech` (16 kHz clips)."""
    level = max(speech_rms(clip) for clip in speech)
    return pink_noise(20.0, rate, level / (10 ** (snr_db / 20)))
