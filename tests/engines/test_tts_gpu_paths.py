"""Kokoro's CUDA path without a GPU: the provider options, and a refusal to run on the CPU.

onnxruntime's InferenceSession is replaced by a double that records the
providers asked for, reports the providers the test says are active (as
`get_providers()` does after a CUDA provider failed to load and onnxruntime
fell back to the CPU), and runs the bundled Kokoro model on the real CPU
session underneath.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime
import pytest

from workers.tts.kokoro import KokoroTts

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class Sessions:
    def __init__(self, active: list[str]) -> None:
        self.active = active
        self.asked: list[list[Any]] = []
        self.runs = 0


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Sessions:
    real = onnxruntime.InferenceSession
    record = Sessions([CUDA, CPU])

    class Session:
        def __init__(self, path: str, sess_options: Any = None, providers: list[Any] | None = None, **_: Any) -> None:
            record.asked.append(list(providers or []))
            self._real = real(path, providers=[CPU])
            self._model_path = path

        def get_providers(self) -> list[str]:
            return list(record.active)

        def run(self, *args: Any, **kwargs: Any) -> Any:
            record.runs += 1
            return self._real.run(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["TensorrtExecutionProvider", CUDA, CPU])
    return record


def test_the_gpu_image_setting_asks_for_cuda_and_refuses_a_cpu_fallback(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONNX_PROVIDER", CUDA)  # what compose/Dockerfile.worker sets
    sessions.active = [CPU]  # the CUDA provider failed to load
    with pytest.raises(RuntimeError, match="CUDA.*runs it on CPUExecutionProvider"):
        KokoroTts().load()


def test_cuda_provider_options(sessions: Sessions) -> None:
    engine = KokoroTts(device="cuda:1")
    engine.load()
    (cuda, options), cpu = sessions.asked[-1]
    assert cuda == CUDA and cpu == CPU
    assert options == {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}
    assert sessions.runs >= 1  # warmed up at load
    chunks = list(engine.synthesize("Hello there. How are you?"))
    assert len(chunks) == 2 and all(c.dtype == np.int16 and len(c) > 2400 for c in chunks)


def test_without_a_cuda_build_of_onnxruntime(sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(RuntimeError, match="no CUDA provider.*onnxruntime-gpu"):
        KokoroTts(device="cuda").load()


def test_cpu_asks_for_the_cpu_provider_only(sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNX_PROVIDER", raising=False)
    sessions.active = [CPU]
    engine = KokoroTts()
    engine.load()
    assert sessions.asked[-1] == [CPU] and sessions.runs == 0  # no warm-up on the CPU


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0"])
def test_bad_devices_are_refused_at_config_time(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        KokoroTts(device=device)
