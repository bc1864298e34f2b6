"""Every benchmark in ops/bench/ runs to completion on a tiny load and prints the fields its issue names.

These tests check the benchmarks' contract, never their figures (performance
targets live in the benchmarks' own output): each script runs as a user runs
it, as a subprocess with `--json`, on real Redis, real worker processes and
the bundled models, with loads small enough for CI. What must hold at any
load is checked: nothing lost, no duplicate, the anchor measured in the same
run, and every key the benchmark created deleted again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, *args: str, timeout_s: float = 300) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "bench" / name), "--json", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def positive(report: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = report[key]
        assert isinstance(value, (int, float)) and value > 0, f"{key} = {value!r}"


def voxbus_keys(url: str) -> set[bytes]:
    return set(sync_redis.Redis.from_url(url).scan_iter("vb:*", count=1000))


def test_bus_hop(redis_url: str) -> None:
    before = voxbus_keys(redis_url)
    r = run_bench("bus_hop.py", "--sessions", "20", "--seconds", "1", "--celery-samples", "30",
                  "--celery-warmup", "5", "--redis-url", redis_url)
    assert r["sessions"] == 20 and r["frames"] == 20 * 50
    assert r["lost"] == 0 and r["duplicates"] == 0
    positive(r, "voxbus_p50_ms", "voxbus_p99_ms", "celery_p50_ms", "celery_p99_ms", "ratio_p99")
    assert r["voxbus_p50_ms"] <= r["voxbus_p99_ms"]
    assert voxbus_keys(redis_url) - before == set(), "bus_hop.py left keys behind"


def test_stages() -> None:
    r = run_bench("stages.py", "--sessions", "10", "--seconds", "1", "--repeats", "1")
    positive(r, "vad_ms_per_frame", "asr_ms", "llm_ttft_ms", "llm_tokens_per_s", "tts_first_audio_ms", "tts_rtf")
    assert 0 <= r["asr_wer"] <= 0.1, r["asr_wer"]  # the bundled tiny.en on Piper speech


def test_recovery(redis_url: str) -> None:
    r = run_bench("recovery.py", "--trials", "1", "--workers", "2", "--jobs", "2", "--tokens", "10",
                  "--redis-url", redis_url)
    assert r["trials"] == 1 and r["killed_jobs"] >= 1
    assert r["lost"] == 0 and r["duplicates"] == 0
    positive(r, "reclaim_s")


def test_barge_in(redis_url: str) -> None:
    r = run_bench("barge_in.py", "--trials", "10", "--llama-trials", "5", "--redis-url", redis_url)
    assert r["pool"] == "llm-cpu" and r["options"]["model"] == "bundled:smollm2-135m-instruct"
    assert r["trials"] == 5 and r["synthetic"]["trials"] == 10
    for part in (r, r["synthetic"]):
        positive(part, "cancel_p50_ms", "cancel_p99_ms", "step_ms", "pubsub_p99_ms")
    assert isinstance(r["met"], bool)


@pytest.mark.timeout(400)
def test_capacity() -> None:
    r = run_bench("capacity.py", "--sessions", "5", "--seconds", "3", "--warmup", "1", timeout_s=360)
    assert r["sessions"] == 5 and r["lost"] == 0 and r["duplicates"] == 0
    assert r["frames_in_redis"] == r["frames_handed"]
    positive(r, "frames_per_s", "ingest_p99_ms", "bridge_cpu_cores", "redis_cpu_cores")
