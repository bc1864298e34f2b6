"""Giving freed heap memory back to the OS (glibc `malloc_trim`), for long-lived processes.

A bridge allocates and frees small buffers all day (Opus frames, numpy
arrays, onnxruntime tensors, TLS records) from several threads; glibc keeps
what was freed in per-thread arenas, so the process's RSS creeps up while
Python's own heap is flat (tracemalloc shows no growth). Trimming every
minute costs a few milliseconds and keeps RSS a measure of what is in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("voxbus.memory")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> bool:
    """malloc_trim(0) where glibc has it; False elsewhere (musl, macOS): nothing to do there."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))
