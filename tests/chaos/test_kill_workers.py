"""kill -9 of an ASR, LLM or TTS worker in the middle of a real call's turn.

Attacked: a call over real WebRTC (aiortc caller -> bridge with Silero VAD ->
`voxbus worker` processes with the bundled faster-whisper, llama.cpp and Piper
models, on a private Redis). Each pool has a second worker process. The worker
holding the turn's job of the stage under test is SIGKILLed at a precise
moment: ASR as soon as the job sits in its pending list, LLM as soon as the
turn's first token is in Redis, TTS as soon as the first agent audio chunk is.

What must hold:
- the kill landed mid-job (the stage had not published its final output);
- the call still gets its answer: the job is taken over by the other worker
  of the pool, the caller hears agent audio, receives the final token, and the
  turn plays to its end (the bridge goes back to listening);
- nothing is duplicated: the session's tokens and audio.out streams hold each
  (turn, seq) once under its own entry id, with no gap; the caller received
  each token delta once; the bridge enqueued the turn's LLM and TTS jobs once;
  the re-run's repeated outputs were refused by Redis (counted by the survivor);
- the dead worker holds no pending job afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from bridge.core import Bridge
from bridge.transports.webrtc import WebRtcTransport
from shared.protocol import STAGE_JOB, Keys, ProtocolError, Transcript, decode_entry
from shared.redis_conn import connect
from tests.support import chaos

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

# A short question without pauses inside (one ASR job), whose reply (about 45 tokens with the
# default system prompt) keeps the LLM and TTS jobs running long enough to be killed mid-job.
QUESTION = "Tell me about the sun."
KILL_WINDOW_S = 90.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(chaos_cluster: chaos.ChaosCluster) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    await asyncio.to_thread(chaos_cluster.ensure_all, 2)  # every pool: the worker to kill and its peer
    async with chaos.chaos_bridge(chaos_cluster) as pair:
        yield pair


async def pending_job(redis: aioredis.Redis, pool: str, stage: str, sid: str) -> tuple[str, str, int] | None:
    """(entry id, holder, turn) of a `stage` job of session `sid` that a worker holds right now."""
    key = Keys.pool_jobs(pool)
    for entry_id, fields in await redis.xrevrange(key, count=20):
        try:
            job = decode_entry(fields)
        except ProtocolError:
            continue
        if isinstance(job, STAGE_JOB[stage]) and job.session == sid:
            for row in await redis.xpending_range(key, Keys.pool_group(pool), entry_id, entry_id, 1):
                return entry_id.decode(), row["consumer"].decode(), job.turn
    return None


async def await_kill_moment(redis: aioredis.Redis, pool: str, stage: str, sid: str) -> tuple[str, str, int]:
    """Poll (every few ms) until the stage's job is mid-run: held (ASR), or its first output is in Redis."""
    output = {"llm": Keys.tokens(sid), "tts": Keys.audio_out(sid)}.get(stage)
    deadline = time.monotonic() + KILL_WINDOW_S
    while time.monotonic() < deadline:
        if output is None or await redis.xlen(output):
            found = await pending_job(redis, pool, stage, sid)
            if found is not None:
                return found
        await asyncio.sleep(0.005)
    raise AssertionError(f"the {stage} job of {sid} never started within {KILL_WINDOW_S:.0f} s")


def counters(worker: chaos.WorkerProc, pool: str, kind: str) -> tuple[float, float]:
    """(jobs reclaimed, outputs refused as duplicates) so far, from the worker's /metrics."""
    return (worker.counter("voxbus_jobs_reclaimed_total", pool=pool),
            worker.counter("voxbus_bus_duplicates_total", kind=kind) if kind else 0.0)


async def jobs_of(redis: aioredis.Redis, pool: str, sid: str, turn: int) -> int:
    count = 0
    for _, fields in await redis.xrange(Keys.pool_jobs(pool)):
        try:
            job = decode_entry(fields)
        except ProtocolError:
            continue
        count += job.session == sid and getattr(job, "turn", None) == turn
    return count


async def transcripts_of(redis: aioredis.Redis, sid: str, turn: int) -> int:
    count = 0
    for _, fields in await redis.xrange(Keys.events(sid)):
        with_msg = decode_entry(fields)
        count += isinstance(with_msg, Transcript) and with_msg.turn == turn and with_msg.final
    return count


@pytest.mark.parametrize("stage", ["asr", "llm", "tts"])
async def test_kill_9_mid_turn_the_call_still_gets_its_answer_once(
        stage: str, stack: tuple[Bridge, WebRtcTransport], chaos_cluster: chaos.ChaosCluster) -> None:
    bridge, transport = stack
    cluster = chaos_cluster
    peers = await asyncio.to_thread(cluster.ensure, stage, 2)
    pool = cluster.pools[stage]
    redis = connect(cluster.redis_url)
    client = await chaos.connected_caller(transport)
    sid = client.session_id
    try:
        kind = {"llm": "tokens", "tts": "audio.out"}.get(stage, "")
        before = {w.worker_id: await asyncio.to_thread(counters, w, pool, kind) for w in peers}
        asked_at = time.time()
        client.mic.play(chaos.question_audio(QUESTION))
        entry_id, holder, turn = await await_kill_moment(redis, pool, stage, sid)
        victim = cluster.by_id(holder)
        victim.kill()
        survivors = [w for w in peers if w is not victim]
        reclaimed_before = sum(before[w.worker_id][0] for w in survivors)
        dupes_before = sum(before[w.worker_id][1] for w in survivors)
        await asyncio.sleep(0.05)  # let whatever the victim had already written reach Redis

        # the kill landed mid-job: the stage's final output was not out yet
        if stage == "asr":
            assert await transcripts_of(redis, sid, turn) == 0, "the ASR job had finished before the kill"
        else:
            at_kill = await chaos.output_ids(redis, Keys.tokens(sid) if stage == "llm" else Keys.audio_out(sid))
            assert at_kill and not any(final for *_, final in at_kill), f"the {stage} job had finished before the kill"
        print(f"\n{stage}: killed {holder} (job {entry_id}, turn {turn}) "
              f"{time.time() - asked_at:.2f} s after the question started")

        transcript = await chaos.wait_transcript(client, 0)
        assert transcript["turn"] == turn, f"the answered turn {transcript['turn']} is not the killed job's {turn}"
        result = await chaos.wait_turn_done(client, turn, asked_at)
        print(f"{stage}: caller heard {result.audio_frames} agent frames; reply {result.agent_text!r}")

        # the answer reached the caller, complete
        assert result.audio_frames >= 25, f"only {result.audio_frames} agent audio frames reached the caller"
        assert result.token_text == result.agent_text, (result.token_text, result.agent_text)
        assert len(result.agent_text.split()) >= 3, result.agent_text

        # nothing duplicated, nothing missing
        counts = await chaos.assert_no_duplicate_outputs(redis, sid, turn)
        chaos.assert_caller_tokens_unique(client)
        assert await jobs_of(redis, cluster.pools["llm"], sid, turn) == 1
        assert await jobs_of(redis, cluster.pools["tts"], sid, turn) == 1
        print(f"{stage}: {counts}")

        # the peer took the job over (and, for LLM/TTS, Redis refused the outputs it repeated)
        reclaimed = await asyncio.to_thread(chaos.pool_counter, survivors, "voxbus_jobs_reclaimed_total", pool=pool)
        assert reclaimed > reclaimed_before, "no surviving worker reclaimed the killed worker's job"
        if kind:
            dupes = await asyncio.to_thread(chaos.pool_counter, survivors, "voxbus_bus_duplicates_total", kind=kind)
            assert dupes > dupes_before, f"the re-run published no {kind} the victim had already written"
        pending = await redis.xpending_range(Keys.pool_jobs(pool), Keys.pool_group(pool), "-", "+", 100,
                                             consumername=holder)
        assert not pending, f"the dead worker still holds {pending}"
        assert all(w.alive for w in survivors)
        assert bridge.sessions[sid].playout.stale_frames == 0
    finally:
        await client.aclose()
        await redis.aclose()
