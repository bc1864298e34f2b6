"""Whisper log-mel features for the end-of-turn model, batched, in numpy.

The same computation as faster-whisper's `FeatureExtractor(feature_size=80)`
and pipecat's `_whisper_features.py` (zero-mean unit-variance waveform,
centred reflect-padded STFT, n_fft 400, hop 160, periodic Hann window, 80
Slaney mel bands, log10, floor at max - 8, (x + 4) / 4; the last frame is
dropped). Written here rather than imported: faster-whisper's module comes
only with the whole package (CTranslate2, tokenizers, PyAV: an end-of-turn
pool needs none of them) and pipecat's with pipecat's dependencies; these
~40 lines of numpy take ~2-7 ms per 8 s window and do a whole batch in one
call. tests/engines/test_eot.py checks them against faster-whisper's
extractor (identical output).
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
N_MELS = 80
WINDOW_S = 8
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE
FRAMES = WINDOW_SAMPLES // HOP  # 800


@functools.cache
def mel_filters() -> np.ndarray:
    """(80, 201) Slaney-scale triangular filters, area-normalised, as librosa and Whisper make them."""
    fft_freqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE)
    mels = np.linspace(0.0, 45.245640471924965, N_MELS + 2)  # mel(0 Hz) .. mel(8 kHz), Slaney scale
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_region = mels >= min_log_mel
    freqs[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    fdiff = np.diff(freqs)
    ramps = freqs.reshape(-1, 1) - fft_freqs.reshape(1, -1)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (freqs[2 : N_MELS + 2] - freqs[:N_MELS]))[:, None]
    return weights.astype(np.float32)


@functools.cache
def _window() -> np.ndarray:
    return np.hanning(N_FFT + 1)[:-1].astype(np.float32)


def fit_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of `audio` (float32 in [-1, 1]), zero-padded at the front to exactly 8 s."""
    audio = np.asarray(audio, dtype=np.float32)[-WINDOW_SAMPLES:]
    if len(audio) < WINDOW_SAMPLES:
        audio = np.concatenate([np.zeros(WINDOW_SAMPLES - len(audio), np.float32), audio])
    return audio


def log_mel(batch: np.ndarray) -> np.ndarray:
    """(n, 128000) float32 8-s windows -> (n, 80, 800) float32 features, each window normalised first."""
    x = np.asarray(batch, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != WINDOW_SAMPLES:
        raise ValueError(f"expected (n, {WINDOW_SAMPLES}) samples, got {x.shape}")
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    x = (x - mean) / np.sqrt(var + 1e-7)
    pad = N_FFT // 2
    x = np.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    n_frames = 1 + (x.shape[1] - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        x, (x.shape[0], n_frames, N_FFT), (x.strides[0], HOP * x.strides[1], x.strides[1]), writeable=False)
    spectrum = np.fft.rfft(frames * _window(), axis=-1)[:, :-1, :]  # (n, 800, 201): Whisper drops the last frame
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    mel = np.matmul(mel_filters(), power.transpose(0, 2, 1))  # (n, 80, 800)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    floor = log_spec.max(axis=(1, 2), keepdims=True) - 8.0
    features: np.ndarray = ((np.maximum(log_spec, floor) + 4.0) / 4.0).astype(np.float32)
    return features
