"""Silero VAD (v5/v6 ONNX) as a VadEngine: one onnxruntime call scores every session's window.

The model is stateful: each call takes the previous 64 samples of context
prepended to the 512-sample window, and an LSTM state of shape (2, batch, 128).
Sessions are stacked along the batch dimension; rows do not interact, so a
batched call gives exactly the per-session results.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shared.models import ModelMissing, resolve

WINDOW_SAMPLES = 512
CONTEXT_SAMPLES = 64
STATE_SIZE = 128
_SR = np.array(16_000, dtype=np.int64)


class SileroState(NamedTuple):
    """One session's streaming state: LSTM state (2, 128) and the last 64 input samples.

    A NamedTuple, not a dataclass: one is made per session per window, and the
    arrays are views into the batch's output (one allocation per call, not per row).
    """

    lstm: np.ndarray
    context: np.ndarray


class SileroVad:
    """VadEngine over the Silero ONNX model; not thread-safe (one caller, the bridge's VAD loop)."""

    window_samples: int = WINDOW_SAMPLES

    def __init__(self, model: str = "bundled:silero-vad", threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelMissing("the silero VAD engine needs onnxruntime: pip install 'voxbus[cpu]'") from exc
        path = resolve(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ModelMissing(f"cannot load Silero VAD model {path!r}: {exc}") from exc
        self.model = path

    def new_state(self) -> SileroState:
        return SileroState(
            np.zeros((2, STATE_SIZE), dtype=np.float32), np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        )

    def score(self, windows: np.ndarray, states: list[SileroState]) -> tuple[np.ndarray, list[SileroState]]:
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape[1] != WINDOW_SAMPLES:
            raise ValueError(f"windows must have shape (n, {WINDOW_SAMPLES}), got {windows.shape}")
        n = windows.shape[0]
        if n != len(states):
            raise ValueError(f"{n} windows but {len(states)} states")
        if n == 0:
            return np.zeros(0, dtype=np.float32), []
        inputs = np.empty((n, CONTEXT_SAMPLES + WINDOW_SAMPLES), dtype=np.float32)
        inputs[:, CONTEXT_SAMPLES:] = windows
        inputs[:, :CONTEXT_SAMPLES] = np.stack([state.context for state in states])
        lstm = np.stack([state.lstm for state in states], axis=1)  # (2, n, 128)
        probs, new_lstm = self._session.run(None, {"input": inputs, "state": lstm, "sr": _SR})
        per_row = np.ascontiguousarray(np.swapaxes(new_lstm, 0, 1))  # (n, 2, 128): row i is session i's
        contexts = inputs[:, -CONTEXT_SAMPLES:].copy()
        new_states = list(map(SileroState, per_row, contexts))
        return np.asarray(probs, dtype=np.float32).reshape(n), new_states
