"""Calls that only need their frames in Redis (recording size, memory, archiving), not turns.

`NoVad` stands in for Silero when what is measured is the audio kept in the
streams: it never hears speech, so no turn or job starts and the figures are
the recording's alone. `caller_track` is the speech such a caller sends: Piper
sentences with 0.8-2.5 s pauses, deterministic per seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.engines.speech import synthesize_16k

SENTENCES = ("I would like to book a table for two people tomorrow evening.",
             "What time does the next train to Boston leave?",
             "How much does it cost to ship a package overseas?")


class NoVad:
    """A VAD engine that never hears speech."""

    window_samples = 512

    def new_state(self) -> None:
        return None

    def score(self, windows: Any, states: Any) -> Any:
        return np.zeros(len(windows), np.float32), states


def caller_track(seed: int, sentences: tuple[str, ...] = SENTENCES, noise_std: float = 0.0) -> np.ndarray:
    """The sentences with random pauses between them, as float64 samples at 16 kHz; with
    `noise_std`, a Gaussian noise floor of that standard deviation (in int16 units) under it all."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    for text in sentences:
        parts += [synthesize_16k(text), np.zeros(round(rng.uniform(0.8, 2.5) * 16_000), dtype=np.int16)]
    track = np.concatenate(parts).astype(np.float64)
    if noise_std:
        track += rng.normal(0.0, noise_std, len(track))
    return track
