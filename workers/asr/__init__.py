"""ASR engines: the interface and the registry (one line per engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shared.plugins import load_engine

ENGINES: dict[str, str] = {
    "faster-whisper": "workers.asr.faster_whisper:FasterWhisperAsr",
}


@dataclass(slots=True)
class AsrResult:
    text: str
    language: str | None = None
    duration_s: float = 0.0


class AsrEngine(Protocol):
    """Speech to text. Methods block: callers run them in a thread, never on the event loop."""

    def load(self) -> None:
        """Load weights (called once, in a thread, before the first job)."""

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> AsrResult:
        """`audio`: float32 mono 16 kHz samples in [-1, 1]."""

    def transcribe_batch(self, audios: list[np.ndarray], language: str | None = None) -> list[AsrResult]:
        """Several utterances at once (batched on GPU engines)."""


def create(name: str, options: dict[str, Any]) -> AsrEngine:
    engine: AsrEngine = load_engine(ENGINES, "asr", name, options)
    return engine
