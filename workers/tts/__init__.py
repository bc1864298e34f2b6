"""TTS engines: the interface and the registry (one line per engine)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from shared.plugins import load_engine

ENGINES: dict[str, str] = {
    "piper": "workers.tts.piper:PiperTts",
    "kokoro": "workers.tts.kokoro:KokoroTts",
}


class TtsEngine(Protocol):
    """Text to speech. Methods block: callers run them in a thread."""

    sample_rate: int

    def load(self) -> None:
        """Load the voice (called once, in a thread)."""

    def synthesize(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        """Yield int16 mono chunks at `sample_rate` as they are synthesized (one per
        sentence or phrase). The caller stops between chunks on cancel."""


def create(name: str, options: dict[str, Any]) -> TtsEngine:
    engine: TtsEngine = load_engine(ENGINES, "tts", name, options)
    return engine
