"""CUDA device handling for CTranslate2 (faster-whisper): device strings, the GPU's compute
capability, and a clear refusal when CTranslate2 cannot run on that GPU.

CTranslate2's PyPI wheels (4.x) carry machine code for sm_53..sm_86 and compute_86
PTX. A GPU of compute capability 8.x runs the sm_86 code as is; newer ones (H100
sm_90, RTX 50xx sm_120) depend on the driver compiling that PTX at first use,
which is unverified on sm_120 (OpenNMT/CTranslate2#1933). The engine therefore
runs a short warm-up transcription at load and turns a failure into one error
that names the GPU, its compute capability and what to do.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

log = logging.getLogger("voxbus.asr")

_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76
NATIVE_MAJOR = 8  # compute capability major the wheels' machine code runs on without JIT


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    capability: tuple[int, int]

    def describe(self) -> str:
        return f"cuda:{self.index} ({self.name}, compute capability {self.capability[0]}.{self.capability[1]})"


def parse_device(device: str, device_index: int | list[int] | None = None) -> tuple[str, int | list[int]]:
    """("cuda:1", None) -> ("cuda", 1); CTranslate2 itself takes only "cpu", "cuda" or "auto"."""
    name, sep, index = device.strip().lower().partition(":")
    if name not in ("cpu", "cuda", "auto"):
        raise ValueError(f"faster-whisper device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if not sep:
        return name, 0 if device_index is None else device_index
    if name != "cuda" or not index.isdigit():
        raise ValueError(f"faster-whisper device {device!r}: only cuda takes an index (cuda:0, cuda:1, ...)")
    if device_index is not None and device_index != int(index):
        raise ValueError(f"faster-whisper device {device!r} and device_index={device_index!r} disagree")
    return "cuda", int(index)


def cuda_device(index: int) -> CudaDevice | None:
    """Name and compute capability from the driver (libcuda), or None without a driver or device."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None
    if (lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev) != 0
            or lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev) != 0):
        return None
    lib.cuDeviceGetName(name, len(name), dev)
    return CudaDevice(index, name.value.decode(errors="replace") or "?", (major.value, minor.value))


def check_visible(indices: list[int]) -> None:
    """Refuse at load, before a model is read, when CTranslate2 sees fewer GPUs than asked for."""
    import ctranslate2

    count = ctranslate2.get_cuda_device_count()
    if count == 0:
        raise RuntimeError(
            f"CTranslate2 {ctranslate2.__version__} sees no CUDA device: no GPU is visible to this process "
            "(NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES, the container's GPU request), or the driver is "
            "older than its CUDA 12 runtime needs (R525 or newer)")
    missing = [i for i in indices if i >= count]
    if missing:
        raise RuntimeError(f"faster-whisper device_index {missing} does not exist: CTranslate2 sees {count} GPU(s)")
    for i in indices:
        device = cuda_device(i)
        if device is not None and device.capability[0] > NATIVE_MAJOR:
            log.warning("%s: CTranslate2's wheels have no machine code for it; the driver compiles their "
                        "compute_86 PTX at first use (slow first load, cached in CUDA_CACHE_PATH)", device.describe())


def unsupported(index: int, exc: BaseException) -> RuntimeError:
    """The error for a warm-up transcription that failed on GPU `index`."""
    import ctranslate2

    device = cuda_device(index)
    where = device.describe() if device else f"cuda:{index}"
    hint = ""
    if device is None or device.capability[0] > NATIVE_MAJOR:
        hint = (" CTranslate2's PyPI wheels carry kernels for sm_53..sm_86 and compute_86 PTX only; run this pool "
                "on a GPU of compute capability 8.x (L4, A10, A100, RTX 30/40) or install a CTranslate2 built "
                "from source with this GPU in CUDA_ARCH_LIST.")
    return RuntimeError(
        f"faster-whisper cannot run on {where} with CTranslate2 {ctranslate2.__version__}: "
        f"{type(exc).__name__}: {exc}.{hint}")
