"""Record -> export -> replay, the exporter's figures and `voxbus top`, with real workers and models.

A session is produced through the bridge's real ingest path (Piper speech
pushed into a CallSession: framing, batched publish, Silero VAD, turn logic),
exported with shared.admin.recording, and replayed against the same workers: with
the same (deterministic) models the transcripts and the agent's words must be
the same. `--stage asr` replays the ASR jobs on a second ASR pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.core import Bridge
from bridge.replay import compare, recorded_turns, replay_asr, replay_session
from shared.admin.exporter import collect_once
from shared.admin.recording import export_session, load, save
from shared.config import Config
from shared.jobs import JobQueue, enqueue
from shared.protocol import AsrJob, Keys
from shared.redis_conn import connect
from tests.engines.speech import pad_silence, synthesize_16k
from tests.support.bridge import ROOT, WorkerSet, delete_session_keys

QUESTIONS = ["What is the capital of France?", "Thank you very much for your help."]


async def _play(session, stop: asyncio.Event) -> None:
    while not stop.is_set():
        session.next_frame()
        await asyncio.sleep(0.02)


async def _wait_answered(session, answers: int, timeout: float = 90.0) -> None:
    """Until the agent has finished speaking its `answers`-th reply (a pause before the end of a
    turn is "listening" too, so the state alone would let the next question cut in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = sum(1 for t in session.times.values() if t.first_audio_ts)
        if session.state.value == "listening" and not session.playout.audible and answered >= answers:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"session never went back to listening: {session.stats()}")


async def make_recorded_session(redis_url: str, config: Config) -> str:
    """A two-turn call through the real ingest path (no WebRTC needed for this)."""
    bridge = Bridge(redis_url, config)
    await bridge.start()
    stop = asyncio.Event()
    try:
        session = await bridge.open_session(f"rec-{uuid.uuid4().hex[:8]}", transport="test")
        player = asyncio.create_task(_play(session, stop))
        for i, text in enumerate(QUESTIONS):
            pcm = pad_silence(synthesize_16k(text), 0.3, 1.5)
            for start in range(0, len(pcm), 320 * 5):  # 100 ms at a time, in real time
                session.push_audio(pcm[start:start + 1600])
                await asyncio.sleep(0.1)
            await _wait_answered(session, i + 1)
        stop.set()
        await player
        return session.id
    finally:
        await bridge.aclose()


@pytest.fixture(scope="module")
def recording(workers: WorkerSet, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    async def make() -> Path:
        sid = await make_recorded_session(redis_url, workers.config())
        redis = connect(redis_url)
        try:
            rec = await export_session(redis, sid)
        finally:
            await redis.aclose()
        path = tmp_path_factory.mktemp("rec") / "call.vbrec"
        save(rec, path)
        return path

    path = asyncio.run(make())
    yield path
    asyncio.run(delete_session_keys(redis_url, [load(path).session]))


def test_export_is_self_describing(recording: Path) -> None:
    rec = load(recording)
    assert rec.format == "voxbus.recording/1"
    turns = recorded_turns(rec)
    assert [t.transcript.rstrip(".?") for t in turns] == [q.rstrip(".?") for q in QUESTIONS]
    assert all(t.agent_text for t in turns), turns
    assert rec.streams["audio.in"] and rec.streams["audio.out"] and rec.ctx


async def test_replay_at_max_speed_reproduces_the_call(recording: Path, workers: WorkerSet, redis_url: str) -> None:
    rec = load(recording)
    _, now = await replay_session(redis_url, workers.config(), rec, "max")
    result = compare(recorded_turns(rec), now)
    assert result["turns_then"] == result["turns_now"] == len(QUESTIONS), result
    for row in result["turns"]:
        assert row["transcript_match"] == 0.0, row
        assert row["agent_now"] == row["agent_then"], row  # deterministic models, same context
        assert set(row["latency_delta_ms"]) >= {"asr_ms", "llm_ttft_ms"}, row


async def test_replay_asr_stage_on_a_second_pool(recording: Path, workers: WorkerSet, redis_url: str, tmp_path: Path) -> None:
    """A/B: the recorded ASR jobs run on another ASR pool (a second worker process)."""
    asr_pool = workers.pools["asr"]
    other = f"{asr_pool}-b"
    text = workers.pools_file.read_text()
    section = text[text.index(f"[pools.{asr_pool}]"):].split("\n\n")[0]
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(text + "\n" + section.replace(f"[pools.{asr_pool}]", f"[pools.{other}]") + "\n")
    env = {**os.environ, "REDIS_URL": redis_url}
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--pool", other, "--pools", str(pools_file)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    redis = connect(redis_url)
    try:
        sid, now = await replay_asr(redis_url, load(recording), other, timeout_s=120)
        then = recorded_turns(load(recording))
        assert [t.transcript for t in now] == [t.transcript for t in then]
        assert all(t.latency["asr_ms"] > 0 for t in now)
        assert await redis.xlen(Keys.pool_dlq(other)) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        await redis.delete(Keys.pool_jobs(other), Keys.pool_workers(other), Keys.pool_errors(other))
        await redis.srem(Keys.POOLS, other)
        await redis.aclose()


async def test_exporter_figures_equal_redis(redis_url: str) -> None:
    """A constructed backlog: 7 jobs, 3 delivered (pending), 1 acked, 2 dead-lettered."""
    pool = f"exp-{uuid.uuid4().hex[:8]}"
    redis = connect(redis_url)
    try:
        q = JobQueue(redis, pool, "c1", stage="asr")
        await q.ensure_group()
        for i in range(7):
            await enqueue(redis, pool, AsrJob(session="s1", turn=i, start_seq=0, end_seq=1))
        taken = await q.read(count=3, block_ms=100)
        await q.ack(taken[0].entry_id)
        for d in taken[1:]:
            await q._dead_letter(d.entry_id, b"x", "test", 1)  # noqa: SLF001 - building a DLQ on purpose
        await redis.sadd(Keys.POOLS, pool)
        rows = {r["pool"]: r for r in await collect_once(redis)}
        row = rows[pool]
        assert row["length"] == await redis.xlen(Keys.pool_jobs(pool)) == 7
        assert row["lag"] == 4
        assert row["pending"] == (await redis.xpending(Keys.pool_jobs(pool), pool))["pending"] == 0
        assert row["dlq"] == await redis.xlen(Keys.pool_dlq(pool)) == 2
        assert row["head_wait_ms"] > 0
    finally:
        await redis.delete(Keys.pool_jobs(pool), Keys.pool_dlq(pool), Keys.pool_errors(pool))
        await redis.srem(Keys.POOLS, pool)
        await redis.aclose()


def test_top_once_shows_the_pools(workers: WorkerSet, redis_url: str) -> None:
    out = subprocess.run([sys.executable, "-m", "shared.cli", "top", "--once", "--pools", str(workers.pools_file)],
                         cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for pool in workers.pools.values():
        assert pool in out.stdout
    assert "recent sessions" in out.stdout


def test_sessions_lists_recorded_session(recording: Path, redis_url: str) -> None:
    sid = load(recording).session
    out = subprocess.run([sys.executable, "-m", "shared.cli", "sessions", "--json", "--limit", "50"], cwd=ROOT,
                         env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    rows = {r["session"]: r for r in json.loads(out.stdout)}
    assert rows[sid]["turns"] == len(QUESTIONS) and rows[sid]["duration_s"] > 3
