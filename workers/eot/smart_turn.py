"""Smart Turn v3.2 (pipecat's BSD-2 audio end-of-turn model) on onnxruntime, batched.

The model hears the last 8 s of the caller (zero-padded at the front) as
Whisper log-mel features (`bridge.eot.features`) and returns the probability
that the turn is complete. The bundled file ships inside the `pipecat-ai`
wheel, installed with --no-deps and found without importing pipecat.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from shared.models import ModelMissing, resolve
from workers.eot.features import SAMPLE_RATE, fit_window, log_mel

log = logging.getLogger("voxbus.eot.smart_turn")


class SmartTurn:
    def __init__(self, model: str = "bundled:smart-turn-v3.2", threads: int = 1) -> None:
        self.model = model
        self.threads = threads
        self._session: Any = None
        self._input = "input_features"

    def load(self) -> None:
        if self._session is not None:
            return
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelMissing("the smart-turn end-of-turn engine needs onnxruntime: pip install 'voxbus[cpu]'") from exc
        path = resolve(self.model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(self.threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        try:
            self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ModelMissing(f"cannot load the Smart Turn model {path!r}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        # The first run allocates the model's buffers (73 ms against 57 ms for the next ones here):
        # at load, not in the first caller's pause.
        self.predict([np.zeros(SAMPLE_RATE, dtype=np.float32)])
        log.info("Smart Turn loaded from %s in %.2f s", path, time.perf_counter() - t0)

    def predict(self, utterances: list[np.ndarray]) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("SmartTurn.load() was not called")
        if not utterances:
            return np.zeros(0, dtype=np.float32)
        features = log_mel(np.stack([fit_window(u) for u in utterances]))
        (probs,) = self._session.run(None, {self._input: features})
        return np.asarray(probs, dtype=np.float32).reshape(len(utterances))
