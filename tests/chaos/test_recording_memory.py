"""Redis memory levels off while calls keep opening and closing: a live window, archiving, a short retention.

One in-process bridge (no VAD model: this is about the frames in Redis, not
turns) on a private redis-server, with a directory archive and a short
`retention_s`. VOXBUS_RECMEM_SESSIONS callers each hold a call for
VOXBUS_RECMEM_CALL_S seconds, pushing real speech in real time (Piper
sentences with 0.8-2.5 s pauses over a -70 dBFS noise floor, looped, 100 ms at
a time, which the bridge publishes as 20 ms Opus frames), hang up and call
again at once, for VOXBUS_RECMEM_SECONDS.

Redis's used_memory is sampled every second once every caller is in. What
must hold: its least-squares slope over the second half (or from the time a
first call has ended and been retained, if later) is under 10 % of the rate at which
the calls write into Redis (measured in the same run: MEMORY USAGE of each
call's streams when it ends, summed, over the run's time), which is how fast
used_memory grows when nothing expires (VOXBUS_RECMEM_ARCHIVE=0: no archive,
keys kept 24 h, the figure before this change; the bound is not checked
then). Every call that ended is in the archive. The figures are printed.

Knobs (environment): VOXBUS_RECMEM_SESSIONS (16), VOXBUS_RECMEM_SECONDS (60),
VOXBUS_RECMEM_CALL_S (6), VOXBUS_RECMEM_RETENTION_S (3), VOXBUS_RECMEM_ARCHIVE (1).
The issue's soak figure: VOXBUS_RECMEM_SESSIONS=120 VOXBUS_RECMEM_SECONDS=480
VOXBUS_RECMEM_CALL_S=120 VOXBUS_RECMEM_RETENTION_S=60, once with VOXBUS_RECMEM_ARCHIVE=0.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.core import Bridge
from shared.admin import archiving
from shared.admin.archive import open_archive
from shared.admin.archiving import sweep
from shared.admin.embedded_redis import EmbeddedRedis
from shared.admin.recording import load
from shared.protocol import Keys
from shared.redis_conn import connect
from tests.support import frames_only
from tests.support.bridge import pools_config

SESSIONS = int(os.environ.get("VOXBUS_RECMEM_SESSIONS") or 16)
SECONDS = float(os.environ.get("VOXBUS_RECMEM_SECONDS") or 60)
CALL_S = float(os.environ.get("VOXBUS_RECMEM_CALL_S") or 6)
RETENTION_S = float(os.environ.get("VOXBUS_RECMEM_RETENTION_S") or 3)
ARCHIVE = os.environ.get("VOXBUS_RECMEM_ARCHIVE", "1") != "0"
ROOT = Path(__file__).resolve().parents[2]
MAX_SLOPE_SHARE = 0.10
# Every call has ended and been retained once by then: what Redis holds can level off from there.
FIT_FROM_S = max(SECONDS / 2, CALL_S + RETENTION_S + 5)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(int(SECONDS + CALL_S) + 300)]


def caller_track(seed: int = 7) -> np.ndarray:
    track = frames_only.caller_track(seed, noise_std=10.0)
    return np.clip(np.round(track), -32768, 32767).astype(np.int16)


def slope(samples: list[tuple[float, float]]) -> float:
    t, y = np.array(samples).T
    return float(np.polyfit(t, y, 1)[0])


async def test_redis_memory_levels_off_while_calls_churn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Deleted within a second of their retention, not five: a sawtooth of five seconds of calls would
    # tilt the slope of a short run. The sweeps come as often, for the calls left behind.
    monkeypatch.setattr(archiving, "REAP_INTERVAL_S", 1.0)
    server = EmbeddedRedis()
    server.start()
    await server.ready()
    archive_dir = tmp_path / "archive"
    bridge_cfg: dict[str, Any] = {"max_sessions": SESSIONS + 8, "idle_timeout_s": 3600.0}
    if ARCHIVE:
        bridge_cfg.update(archive_url=archive_dir.as_uri(), retention_s=RETENTION_S)
    bridge = Bridge(server.url, pools_config(**bridge_cfg), vad_engine=frames_only.NoVad())
    redis = connect(server.url)  # a blocking pool: 120 callers may measure their streams at once
    track = caller_track()
    written: dict[str, int] = {}  # bytes of each call's streams in Redis when it ended
    call_minutes = 0.0
    stop = asyncio.Event()

    async def caller(i: int) -> None:
        nonlocal call_minutes
        at = (i * 7919) % len(track)
        n = 0
        while not stop.is_set():
            session = await bridge.open_session(f"mem-{i}-{n}", transport="test")
            started = time.monotonic()
            next_push = started
            while time.monotonic() - started < CALL_S and not stop.is_set():
                chunk = track[at:at + 1600]
                at = (at + 1600) % (len(track) - 1600)
                session.push_audio(chunk)
                next_push += 0.1
                await asyncio.sleep(max(0.0, next_push - time.monotonic()))
            await asyncio.sleep(0.05)  # the publisher's last round trip
            sizes = [await redis.memory_usage(k, samples=0) or 0 for k in Keys.session_streams(session.id)]
            if any(sizes):  # a call opened as the run stopped has nothing recorded, and nothing to archive
                written[session.id] = sum(sizes)
            call_minutes += (time.monotonic() - started) / 60
            await bridge.close_session(session.id)
            n += 1

    samples: list[tuple[float, float]] = []
    try:
        await bridge.start()
        if bridge.archiver is not None:
            bridge.archiver.settle_s, bridge.archiver.sweep_interval_s = 0.5, 5.0
        base = int((await redis.info("memory"))["used_memory"])
        callers = []
        first_call = time.monotonic()
        for i in range(SESSIONS):  # the calls' starts and ends spread over one call's length
            callers.append(asyncio.create_task(caller(i)))
            await asyncio.sleep(CALL_S / SESSIONS)
        t0 = time.monotonic()
        backlog = 0  # calls ended and not archived yet, at worst
        while (elapsed := time.monotonic() - t0) < SECONDS:
            samples.append((elapsed, int((await redis.info("memory"))["used_memory"])))
            if ARCHIVE:
                backlog = max(backlog, len(written) - sum(1 for _ in archive_dir.glob("*.vbrec")))
            await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*callers)
        ran_s = time.monotonic() - first_call
        await bridge.aclose()
        if ARCHIVE:  # what the bridge left unarchived at its shutdown, another process's sweep archives
            late = await sweep(redis, open_archive(archive_dir.as_uri()), retention_s=RETENTION_S, who="after",
                               ended_grace_s=0)
        second_half = [s for s in samples if s[0] >= FIT_FROM_S]
        after = slope(second_half)
        write_rate = sum(written.values()) / ran_s
        archived = sorted(archive_dir.glob("*.vbrec")) if ARCHIVE else []
        archive_bytes = sum(p.stat().st_size for p in archived)
        steady = float(np.mean([y for _, y in second_half])) - base
        print(f"\nrecording memory: {SESSIONS} sessions, calls of {CALL_S:g} s, {SECONDS:g} s, archive={ARCHIVE}, "
              f"retention {RETENTION_S:g} s; {len(written)} calls, {call_minutes:.1f} call-minutes\n"
              f"  used_memory: base {base / 1e6:.2f} MB, end {samples[-1][1] / 1e6:.2f} MB, "
              f"steady above base {steady / 1e6:.2f} MB ({steady / SESSIONS / 1e3:.0f} kB per concurrent call)\n"
              f"  slope from {FIT_FROM_S:g} s to the end {after / 1e3:.2f} kB/s; calls write {write_rate / 1e3:.2f} kB/s into Redis "
              f"({sum(written.values()) / max(call_minutes, 1e-9) / 1e3:.0f} kB per call-minute of streams)\n"
              f"  archive: {len(archived)} files, {archive_bytes / max(call_minutes, 1e-9) / 1e3:.0f} kB per call-minute, "
              f"at worst {backlog} ended calls waiting to be archived")
        if ARCHIVE:
            missing = set(written) - {p.name.removesuffix(".vbrec") for p in archived}
            assert not missing, f"calls not in the archive: {missing}; the last sweep: {late}"
            assert len(load(archived[0]).streams["audio.in"]) > 0
            assert len(second_half) >= 20, f"VOXBUS_RECMEM_SECONDS too short to see a level: fit from {FIT_FROM_S:g} s"
            assert after < MAX_SLOPE_SHARE * write_rate, (after, write_rate)
    finally:
        stop.set()
        await redis.aclose()
        server.stop()


def test_opus_caller_audio_takes_over_5x_less_redis_memory_than_pcm() -> None:
    """ops/bench/recording_size.py on a small load: audio.in per call-minute, PCM (before) over Opus (now)."""
    proc = subprocess.run([sys.executable, str(ROOT / "ops" / "bench" / "recording_size.py"), "--json", "--callers", "2",
                           "--seconds", "6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    print(f"\naudio.in bytes per call-minute: pcm {report['pcm']['redis_bytes_per_call_minute']['audio.in']}, "
          f"opus {report['opus']['redis_bytes_per_call_minute']['audio.in']}")
    assert report["audio_in_ratio_pcm_over_opus"] >= 5.0, report
    assert report["opus"]["file_bytes_per_call_minute"]["zstd"] < report["opus"]["file_bytes_per_call_minute"]["none"]
