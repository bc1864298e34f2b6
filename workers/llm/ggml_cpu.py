"""Which ggml CPU kernels llama.cpp runs here: chosen at run time from what the kernel says this CPU can do.

`ops/dev` builds llama-cpp-python with `GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`:
one small library per x86 feature level (`libggml-cpu-haswell.so`,
`-icelake.so`, `-sapphirerapids.so`, ...) next to `libllama.so`. ggml's own
loader has two problems for us: it looks for them beside the Python binary
and in the current directory, not in the package, so it finds none; and it
scores them with CPUID alone (its source says "this does not check for OS
support"), so a KVM guest that advertises AMX without enabling its register
state would get the AMX variant and die with SIGILL, as `-march=native`
builds did. Here the variant is chosen from the flags in /proc/cpuinfo,
which Linux clears for features the OS has not enabled, with ggml's own
scoring, and loaded before the first model. A build without variants (plain
AVX2) needs nothing and this is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("voxbus.llm.ggml")

# Variant -> the /proc/cpuinfo flags its kernels need, as in ggml/src/CMakeLists.txt.
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
VARIANTS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "skylakex": _HASWELL + _AVX512,
    "cannonlake": _HASWELL + _AVX512 + ("avx512vbmi",),
    "cascadelake": _HASWELL + _AVX512 + ("avx512_vnni",),
    "icelake": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni"),
    "cooperlake": _HASWELL + _AVX512 + ("avx512_vnni", "avx512_bf16"),
    "zen4": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": _HASWELL + ("avx_vnni",),
    "sapphirerapids": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}
# ggml's score bits (ggml-cpu/arch/x86/cpu-feats.cpp): the highest-scoring usable variant wins.
_WEIGHTS = {"fma": 1, "f16c": 2, "sse4_2": 4, "bmi2": 8, "avx": 16, "avx2": 32, "avx_vnni": 64, "avx512f": 128,
            "avx512vbmi": 256, "avx512_bf16": 512, "avx512_vnni": 1024, "amx_int8": 2048}

ENV_OVERRIDE = "VOXBUS_GGML_CPU"  # force a variant by name (e.g. haswell), for benchmarks and bug hunts

_lock = threading.Lock()
_chosen: str | None = None


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def best_variant(flags: frozenset[str], available: set[str]) -> str | None:
    """The usable variant ggml would score highest, among `available`; None if none is usable."""
    usable = [v for v in available if v in VARIANTS and all(f in flags for f in VARIANTS[v])]
    if not usable:
        return None
    return max(usable, key=lambda v: (1 + sum(_WEIGHTS.get(f, 0) for f in set(VARIANTS[v])), len(VARIANTS[v])))


def _lib_dirs() -> tuple[Path, list[Path]]:
    """llama_cpp's own library folder, and where a variants build put the variants: scikit-build
    installs them by CMake's CMAKE_INSTALL_BINDIR, i.e. `bin/` beside the package."""
    import llama_cpp

    package = Path(llama_cpp.__file__).resolve().parent
    return package / "lib", [package / "lib", package.parent / "bin"]


def load_cpu_backend() -> str | None:
    """Load the best CPU variant of a variants build before any model; returns its name (None: not such a build)."""
    global _chosen
    with _lock:
        if _chosen is not None:
            return _chosen or None
        lib, search = _lib_dirs()
        files = {p.name[len("libggml-cpu-"):-len(".so")]: p for d in search for p in d.glob("libggml-cpu-*.so")}
        if not files:
            _chosen = ""
            return None
        forced = os.environ.get(ENV_OVERRIDE)
        name = forced or best_variant(cpu_flags(), set(files))
        if name is None or name not in files:
            raise RuntimeError(f"no llama.cpp CPU variant in {lib} suits this CPU (have {sorted(files)}; "
                               f"{ENV_OVERRIDE}={forced!r})" if forced else f"no llama.cpp CPU variant in {lib} suits this CPU")
        # The very file libllama.so was linked against (its DT_NEEDED, found through its $ORIGIN
        # RUNPATH): a copy under another name would be a second library with a registry of its own.
        soname = next((p for p in (lib / "libggml.so.0", lib / "libggml.so") if p.exists()), lib / "libggml.so")
        ggml = ctypes.CDLL(str(soname))
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        if not ggml.ggml_backend_load(str(files[name]).encode()):
            raise RuntimeError(f"ggml could not load its CPU backend {files[name]}")
        log.info("llama.cpp CPU kernels: %s (%s)", name, "forced" if forced else "best for this CPU's flags")
        _chosen = name
        return name
