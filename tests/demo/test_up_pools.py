"""`voxbus up` with several pools of one stage, as a user first tries it: one pools file with an
ASR pool and its fallback pool, `voxbus up --pools F` starts a worker for every pool of the file
(not only each stage's default), and a real backlog spills into the fallback, where `voxbus top`
shows it. Real processes, real Redis, real faster-whisper on real speech.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.bus import BatchPublisher
from shared.config import load_config
from shared.protocol import AsrJob, Keys, OpusFrame, Transcript, decode_entry, frame_entry_id
from shared.redis_conn import connect
from shared.routing import Router
from tests.engines.speech import pad_silence, synthesize_16k
from tests.support.pools import renamed_cpu_pools_toml

ROOT = Path(__file__).resolve().parents[2]
JOBS = 8


def pools_file(tmp_path: Path) -> tuple[Path, str, str]:
    suffix = "u" + uuid.uuid4().hex[:6]
    text = renamed_cpu_pools_toml(suffix)
    primary = f"asr-cpu-{suffix}"
    fallback = f"asr-b-{suffix}"
    # The default ASR pool overflows into a second one as soon as one job waits.
    text = text.replace(f"[pools.{primary}]\n", f"[pools.{primary}]\nfallback = \"{fallback}\"\noverflow_lag = 1\n")
    section = text[text.index(f"[pools.{primary}]"):].split("\n\n")[0]
    extra = "\n".join(line for line in section.splitlines() if not line.startswith(("fallback", "overflow_lag")))
    text += "\n" + extra.replace(f"[pools.{primary}]", f"[pools.{fallback}]") + "\n"
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path, primary, fallback


async def publish_call(redis_url: str, sid: str) -> int:
    """A session's caller audio as a bridge writes it (Opus frames); returns the last frame's seq."""
    from shared.opus import OpusEncoder

    pcm = pad_silence(synthesize_16k("What is the capital of France?"), 0.2, 0.2)
    enc = OpusEncoder()
    redis = connect(redis_url)
    pub = BatchPublisher(redis)
    try:
        n = len(pcm) // 320
        for seq in range(n):
            pub.publish_nowait(Keys.audio_in(sid), OpusFrame(session=sid, seq=seq, opus=enc.encode(pcm[seq * 320:(seq + 1) * 320])),
                               entry_id=frame_entry_id(seq))
        await pub.flush()
        return n - 1
    finally:
        await pub.aclose()
        await redis.aclose()


@pytest.mark.timeout(400)
def test_up_starts_every_pool_and_a_backlog_overflows_into_the_fallback(tmp_path: Path, redis_url: str) -> None:
    path, primary, fallback = pools_file(tmp_path)
    env = {**os.environ, "REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--pools", str(path), "--port", "0"], cwd=ROOT,
                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "voxbus up: open" not in (text := Path(log.name).read_text()):
            assert up.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(0.5)
        assert fallback in text and primary in text, text[-3000:]  # both pools' workers were started

        sid = f"up-{uuid.uuid4().hex[:8]}"
        routes = asyncio.run(_backlog(redis_url, path, sid))
        assert {r.pool for r in routes} == {primary, fallback}, [(r.pool, r.reason) for r in routes]
        top = subprocess.run([sys.executable, "-m", "shared.cli", "top", "--once", "--pools", str(path)], cwd=ROOT,
                             env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        row = next(line for line in top.stdout.splitlines() if fallback in line)
        print(f"\nvoxbus top, fallback row: {row.strip()}")
        cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
        assert cells[3] == "1", cells  # one worker serves the fallback pool
        assert float(cells[8]) > 0, cells  # and it ran jobs: its p50 job time is measured
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
        log.close()


async def _backlog(redis_url: str, path: Path, sid: str) -> list:
    config = load_config(str(path))
    last = await publish_call(redis_url, sid)
    redis = connect(redis_url)
    pub = BatchPublisher(redis)
    router = Router(redis, config, stats_ttl_s=0.0)
    try:
        routes = [await router.submit(pub, "asr", AsrJob(session=sid, turn=t, start_seq=0, end_seq=last)) for t in range(JOBS)]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = {m.turn for _, f in await redis.xrange(Keys.events(sid)) if isinstance(m := decode_entry(f), Transcript)}
            if len(done) == JOBS:
                break
            await asyncio.sleep(0.5)
        assert len(done) == JOBS, done
        await asyncio.sleep(1.5)  # a heartbeat carries the workers' job times into the registry
        return routes
    finally:
        await pub.aclose()
        for key in [*Keys.session_streams(sid)]:
            await redis.delete(key)
        await redis.aclose()
