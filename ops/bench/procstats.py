"""Measurements the benchmarks share: CPU time of this process and of the machine, percentiles, child hand-off."""

from __future__ import annotations

import resource
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, all cores, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def pct(values: np.ndarray, q: float) -> float | None:
    """The q-th percentile rounded to µs when the values are ms; None for no values."""
    return round(float(np.percentile(values, q)), 3) if values.size else None


def receive_from(conn: Connection, proc: Any, timeout: float) -> Any:
    """A child process's next message; raises if it dies or stays silent for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} sent nothing within {timeout:.0f}s")
    return conn.recv()
