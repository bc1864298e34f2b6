"""End-of-turn engines: the interface and the registry (one line per engine).

An end-of-turn engine takes utterances (16 kHz float32 samples ending at the
caller's pause; it looks at the last up to 8 s of each) and returns, per
utterance, the probability that the caller has finished the turn. The bridge
asks at each pause in the caller's speech (`bridge.turns`); the `eot` stage
(workers/stages/eot.py) batches the requests of every session.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from shared.plugins import load_engine

ENGINES: dict[str, str] = {
    "smart-turn": "workers.eot.smart_turn:SmartTurn",
}


class EotEngine(Protocol):
    """Blocking methods: callers run them in a thread."""

    def load(self) -> None:
        """Load the model (called once, before the first job)."""

    def predict(self, utterances: list[np.ndarray]) -> np.ndarray:
        """P(turn complete) for each utterance, in one batched call."""


def create(name: str, options: dict[str, Any]) -> EotEngine:
    engine: EotEngine = load_engine(ENGINES, "eot", name, options)
    return engine
