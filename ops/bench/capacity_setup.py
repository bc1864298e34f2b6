"""What one run of ops/bench/capacity.py stands on: Redis, the pools file, the ASR worker, the clean-up.

- Redis is by default the project's embedded Redis (`EmbeddedRedis`), started
  for the whole invocation and without persistence, so that its INFO cpu
  counters are this benchmark's alone (`--redis-url` uses another server,
  whose CPU then includes its other clients).
- ONE real worker process (`voxbus worker`, the ASR pool of ops/pools/cpu.toml
  under a unique name) consumes the ASR jobs, as a one-slot worker would be
  deployed beside a latency-critical process: one math thread (cpu_threads=1,
  OMP/OpenBLAS 1) at nice 19.
- The anchor: one XADD at a time on the idle bus before any load, the floor
  under every ingest latency.
- Every key a run creates (its sessions', its pools', the anchor's) is deleted
  at the end, also on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from capacity_spec import CapSpec

from shared.admin.embedded_redis import EmbeddedRedis
from shared.protocol import Keys
from shared.stats import percentile

ROOT = Path(__file__).resolve().parents[2]


def start_redis() -> EmbeddedRedis:
    """The project's embedded Redis, ready; the caller stops it."""
    server = EmbeddedRedis()
    server.start()
    try:
        asyncio.run(server.ready())
    except BaseException:
        server.stop()
        raise
    return server


def _toml(value: Any) -> str:
    """A TOML value: JSON's strings, numbers and booleans; tables inline (`{ k = v }`, not JSON's `{"k": v}`)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def write_pools(path: str, suffix: str, sessions: int, asr_threads: int, audio_codec: str | None = None) -> dict[str, str]:
    """ops/pools/cpu.toml with unique pool names, `max_sessions` >= N, the ASR threads bound and
    (if given) the bridge's audio codec."""
    import tomllib

    from shared.config import DEFAULT_POOLS_FILE

    data = tomllib.loads(Path(DEFAULT_POOLS_FILE).read_text())
    names = {stage: f"{pool}-{suffix}" for stage, pool in data["defaults"].items()}
    lines = ["[defaults]", *[f'{stage} = "{name}"' for stage, name in names.items()]]
    for name, pool in data["pools"].items():
        options = dict(pool.get("options", {}))
        if pool["stage"] == "asr" and asr_threads > 0:
            options["cpu_threads"] = asr_threads
        lines.append(f"\n[pools.{name}-{suffix}]")
        lines += [f"{k} = {_toml(v)}" for k, v in pool.items() if k not in ("options", "fallback")]
        lines.append(f"options = {_toml(options)}")
    lines.append("\n[bridge]")
    bridge = {**data.get("bridge", {}), "max_sessions": sessions}
    if audio_codec:
        bridge["audio_codec"] = audio_codec
    lines += [f"{k} = {_toml(v)}" for k, v in bridge.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return names


def _voxbus_command() -> list[str]:
    script = Path(sys.executable).parent / "voxbus"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shared.cli"]


def start_worker(url: str, pools_file: str, pool: str, nice: int, log_file: Any) -> subprocess.Popen[bytes]:
    cmd = [*_voxbus_command(), "worker", "--pool", pool, "--pools", pools_file, "--redis-url", url,
           "--drain-timeout", "1"]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    # A one-slot worker: its math libraries get one thread each (idle OpenBLAS/OpenMP threads
    # spin-wait, which on two cores takes CPU from everything else).
    env = {**os.environ, **{v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def wait_worker(client: Any, pool: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.zcard(Keys.pool_workers(pool)):
        if proc.poll() is not None:
            raise RuntimeError(f"ASR worker exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"ASR worker did not register within {timeout:.0f}s")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def count_in_redis(client: Any, spec: CapSpec) -> int:
    """Entries in the run's sessions' `audio.in` streams."""
    keys = [Keys.audio_in(sid) for sid in spec.session_ids()]
    total = 0
    for i in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for key in keys[i : i + 1000]:
            pipe.xlen(key)
        total += sum(pipe.execute())
    return total


def _delete(client: Any, keys: list[Any]) -> None:
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def delete_run_keys(client: Any, spec: CapSpec, pools: dict[str, str]) -> None:
    """Every key of the run's sessions and pools, and their entries in the global registries."""
    _delete(client, list(client.scan_iter(match=Keys.session_pattern(spec.session_prefix), count=2000)))
    for pool in pools.values():
        _delete(client, [Keys.pool_jobs(pool), Keys.pool_dlq(pool), Keys.pool_errors(pool), Keys.pool_workers(pool),
                         *client.scan_iter(match=Keys.worker_pattern(pool), count=2000)])
    sids = spec.session_ids()
    for i in range(0, len(sids), 1000):
        client.zrem(Keys.SESSIONS, *sids[i : i + 1000])
    client.srem(Keys.POOLS, *pools.values())


def idle_xadd_rtt(client: Any, run_id: str, samples: int = 300) -> dict[str, float | None]:
    """One XADD at a time on an idle bus, before the load: the floor under any ingest latency."""
    key = Keys.bench(f"capacity:{run_id}:anchor")
    payload = os.urandom(640)
    lat = []
    try:
        for i in range(samples):
            t0 = time.perf_counter()
            client.xadd(key, {"m": payload}, id=f"{i + 1}-0")
            lat.append((time.perf_counter() - t0) * 1000)
    finally:
        client.delete(key)
    arr = np.array(lat[20:])
    return {"idle_xadd_rtt_p50_ms": percentile(arr, 50), "idle_xadd_rtt_p99_ms": percentile(arr, 99)}
