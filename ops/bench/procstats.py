"""What the benchmarks share: CPU time of this process and of the machine, child hand-off, printing the report."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


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



def receive_from(conn: Connection, proc: Any, timeout: float) -> Any:
    """A child process's next message; raises if it dies or stays silent for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} sent nothing within {timeout:.0f}s")
    return conn.recv()


def emit(report: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Print a benchmark's report: one JSON object with --json, else its table (default: one line per figure)."""
    if as_json:
        print(json.dumps(report))
    elif table is not None:
        table(report)
    else:
        for key, value in report.items():
            print(f"{key:>40}: {value}")
