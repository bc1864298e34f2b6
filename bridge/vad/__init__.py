"""VAD engines: the interface and the registry (one line per engine).

A VAD engine scores fixed windows of 16 kHz audio for many sessions in one call;
`bridge.vad.segmenter` turns the scores into speech start / end decisions.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from shared.plugins import load_engine

ENGINES: dict[str, str] = {
    "silero": "bridge.vad.silero:SileroVad",
}


class VadEngine(Protocol):
    window_samples: int  # samples per scored window (512 for Silero at 16 kHz)

    def new_state(self) -> Any:
        """Fresh per-session streaming state."""

    def score(self, windows: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """Speech probability for each row of `windows` (float32, shape (n, window_samples)),
        one row per session, with that session's state; returns probabilities and new states."""


def create(name: str, options: dict[str, Any]) -> VadEngine:
    engine: VadEngine = load_engine(ENGINES, "vad", name, options)
    return engine
