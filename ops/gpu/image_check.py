"""Build-time checks of the GPU worker image (compose/Dockerfile.worker): no GPU needed.

What a real deployment would otherwise find only at engine start:
- vLLM is the version pinned in compose/constraints-gpu.txt (the OpenAI server's),
  and its torch is a CUDA 12 build (the base image's CUDA line);
- a C compiler and Python.h are there (vLLM V1's Triton JIT compiles its launchers);
- onnxruntime is the GPU build (no CPU `onnxruntime` shadowing it), lists the CUDA
  provider, and every library that provider links resolves in this image (a CUDA 13
  build on the CUDA 12 image fails here, not in Kokoro at run time);
- CTranslate2 can load the cuBLAS it needs (libcublas.so.12).

Usage: python ops/gpu/image_check.py [--constraints compose/constraints-gpu.txt]
Prints one line per check and exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

DRIVER_LIBS = {"libcuda.so.1"}  # mounted by the NVIDIA container runtime at run time, absent at build


def pinned(constraints: Path, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)", constraints.read_text(), re.MULTILINE)
    if not match:
        raise AssertionError(f"{constraints} pins no {name}")
    return match.group(1)


def check_vllm(constraints: Path) -> str:
    want, have = pinned(constraints, "vllm"), importlib.metadata.version("vllm")
    assert have == want, f"vllm {have} installed, {want} pinned (the OpenAI server's version)"
    import torch

    cuda = torch.version.cuda or ""
    assert cuda.startswith("12."), f"torch {torch.__version__} is built for CUDA {cuda or 'none'}, the image has CUDA 12"
    return f"vllm {have}, torch {torch.__version__} (CUDA {cuda})"


def check_compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    assert cc, "no C compiler: vLLM's Triton JIT fails with 'Failed to find C compiler'"
    assert header.exists(), f"no {header}: install python3-dev"
    return f"{cc}, {header}"


def missing_libraries(library: Path) -> list[str]:
    out = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line and line.split()[0] not in DRIVER_LIBS]


def check_onnxruntime(constraints: Path) -> str:
    try:
        importlib.metadata.distribution("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        raise AssertionError("the CPU `onnxruntime` is installed and shadows onnxruntime-gpu's module")
    want, have = pinned(constraints, "onnxruntime-gpu"), importlib.metadata.version("onnxruntime-gpu")
    assert have == want, f"onnxruntime-gpu {have} installed, {want} pinned"
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    assert "CUDAExecutionProvider" in providers, providers
    library = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    missing = missing_libraries(library)
    assert not missing, f"{library.name} needs {', '.join(missing)}, not in this image (a build for another CUDA?)"
    return f"onnxruntime-gpu {have}, CUDA provider libraries resolve"


def check_ctranslate2() -> str:
    import ctranslate2

    ctypes.CDLL("libcublas.so.12")
    return f"ctranslate2 {ctranslate2.__version__}, libcublas.so.12 loads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--constraints", type=Path, default=Path("compose/constraints-gpu.txt"))
    args = parser.parse_args(argv)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("vllm", lambda: check_vllm(args.constraints)),
        ("compiler", check_compiler),
        ("onnxruntime", lambda: check_onnxruntime(args.constraints)),
        ("ctranslate2", check_ctranslate2),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"ok   {name}: {check()}")
        except Exception as exc:  # each check reports, then the build fails once
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
