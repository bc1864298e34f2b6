"""`voxbus replay`: run a recorded session again against today's workers and compare.

Full replay re-injects the recorded caller audio into a new session through
the bridge's real ingest path (framing, batched publish, VAD, turn logic):
with original timing at --speed 1 or 2, or as fast as the pipeline takes it at
--speed max, where feeding pauses while the agent thinks and speaks so turns
do not overlap. It then compares every turn: transcript then/now (word error
rate), agent text then/now, stage latencies then/now. `--report OUT.html`
also writes the `voxbus inspect` view of both runs side by side (replayed at
the recorded pace unless --speed says otherwise: a faster feed puts the
caller's audio and the events on different clocks).

`--stage asr --pool P` re-runs only the recorded ASR jobs on pool P (A/B a
model or a GPU type): the recorded audio is copied into a new session's
audio.in and each utterance's job is enqueued on P.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared.admin.recording import Recording, RecordingError, load
from shared.caller_audio import to_pcm
from shared.protocol import (
    ENTRY_FIELD,
    FRAME_SAMPLES,
    AsrJob,
    AudioFrame,
    Keys,
    OpusFrame,
    TokenChunk,
    Transcript,
    TurnMark,
    decode_entry,
    encode,
    frame_entry_id,
)
from shared.redis_conn import xread
from shared.wer import wer


@dataclass
class RecordedTurn:
    turn: int
    transcript: str
    start_seq: int = 0
    end_seq: int = 0
    agent_text: str = ""
    latency: dict[str, float] = field(default_factory=dict)


def recorded_turns(rec: Recording) -> list[RecordedTurn]:
    """The recording's user turns (final, non-empty transcripts) with their replies and marks."""
    turns: dict[int, RecordedTurn] = {}
    for msg in rec.messages("events"):
        if isinstance(msg, Transcript) and msg.final and msg.text.strip():
            turns[msg.turn] = RecordedTurn(msg.turn, msg.text, msg.start_seq, msg.end_seq, latency={"asr_ms": msg.asr_ms})
    for msg in rec.messages("events"):
        if isinstance(msg, TurnMark) and msg.turn in turns:
            key = {("llm", "ttft"): "llm_ttft_ms", ("tts", "first_audio"): "tts_first_audio_ms"}.get((msg.stage, msg.mark))
            if key:
                turns[msg.turn].latency[key] = msg.value_ms
    texts: dict[int, list[str]] = {}
    for msg in rec.messages("tokens"):
        if isinstance(msg, TokenChunk):
            texts.setdefault(msg.turn, []).append(msg.text)
    for turn, parts in texts.items():
        if turn in turns:
            turns[turn].agent_text = "".join(parts).strip()
    return [turns[k] for k in sorted(turns)]


def recorded_frames(rec: Recording) -> list[AudioFrame | OpusFrame]:
    """The caller's frames (PCM, or Opus since recordings are compact), in seq order."""
    return sorted((m for m in rec.messages("audio.in") if isinstance(m, AudioFrame | OpusFrame)), key=lambda m: m.seq)


def compare(then: list[RecordedTurn], now: list[RecordedTurn]) -> dict[str, Any]:
    rows = []
    for i in range(max(len(then), len(now))):
        a = then[i] if i < len(then) else None
        b = now[i] if i < len(now) else None
        row: dict[str, Any] = {
            "index": i,
            "transcript_then": a.transcript if a else None, "transcript_now": b.transcript if b else None,
            "transcript_match": round(wer(a.transcript, b.transcript), 4) if a and b else 1.0,
            "agent_then": a.agent_text if a else None, "agent_now": b.agent_text if b else None,
            "latency_then": a.latency if a else {}, "latency_now": b.latency if b else {},
        }
        if a and b:
            row["latency_delta_ms"] = {k: round(b.latency[k] - a.latency[k], 1)
                                       for k in a.latency if k in b.latency and a.latency[k] and b.latency[k]}
        rows.append(row)
    return {"turns": rows, "turns_then": len(then), "turns_now": len(now)}


# ------------------------------------------------------------------ full replay

async def replay_session(redis_url: str, config: Any, rec: Recording, speed: str,
                         turn_timeout_s: float = 60.0) -> tuple[str, list[RecordedTurn]]:
    """Feed the recording's caller audio into a new session; returns (session id, its turns)."""
    from .core import Bridge
    from .session import TurnState

    frames = recorded_frames(rec)
    if not frames:
        raise RecordingError("the recording holds no caller audio")
    bridge = Bridge(redis_url, config)
    await bridge.start()
    sid = f"replay-{uuid.uuid4().hex[:10]}"
    try:
        session = await bridge.open_session(sid, transport="replay")
        t0, rec_t0 = time.monotonic(), frames[0].ts
        factor = {"1": 1.0, "2": 2.0}.get(speed)
        player = asyncio.create_task(_play(session, int(factor or 0)))
        batch = 25  # frames pushed per step at max speed (0.5 s of audio)
        pcm = to_pcm(frames)  # decoded in one go: an Opus decoder's state runs across the call
        for i, frame in enumerate(frames):
            if factor is not None:
                delay = (frame.ts - rec_t0) / factor - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
            elif _deciding(session):
                # The end of a turn is being decided on the wall clock (the model's verdict, its
                # rescoring, min/max endpointing): feed the silence in real time meanwhile, or the
                # caller's next words would arrive before the decision they followed.
                await asyncio.sleep(0.02)
            elif i % batch == 0:
                await asyncio.sleep(0.02)  # one ingest tick
                await _wait_idle(session, TurnState, turn_timeout_s)
            at = (frame.seq - frames[0].seq) * FRAME_SAMPLES
            session.push_audio(pcm[at:at + FRAME_SAMPLES], capture_ts=time.time())
        await asyncio.sleep(0.5)
        await _wait_idle(session, TurnState, turn_timeout_s)
        now = [
            RecordedTurn(t.turn, t.user_text, agent_text=t.agent_text,
                         latency={"asr_ms": t.asr_ms, "llm_ttft_ms": t.llm_ttft_ms, "tts_first_audio_ms": t.tts_first_audio_ms})
            for t in sorted(session.times.values(), key=lambda t: t.turn) if t.user_text.strip()
        ]
        player.cancel()
        return sid, now
    finally:
        await bridge.aclose()


async def _play(session: Any, frames_per_tick: int) -> None:
    """Stands in for a transport: takes agent frames at 1x / 2x real time, or all at once (0)."""
    while True:
        n = frames_per_tick or 1_000_000
        for _ in range(n):
            if session.next_frame() is None and not session.playout.audible:
                break
        await asyncio.sleep(0.02)


def _deciding(session: Any) -> bool:
    """The turn machine holds a turn whose end is not decided yet (a pause being scored)."""
    return getattr(session.machine, "_spec", None) is not None  # noqa: SLF001 - replay drives the session


async def _wait_idle(session: Any, states: Any, timeout_s: float) -> None:
    """Until the session listens again with nothing to play (the agent's answer is done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame_pending = session.playout.audible or session._frames  # noqa: SLF001 - replay drives the session
        thinking = session.state in (states.THINKING, states.AGENT_SPEAKING)
        if not thinking and not frame_pending:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"session {session.id}: no answer within {timeout_s:.0f}s (are workers running?)")


# ------------------------------------------------------------------ ASR-only replay

async def replay_asr(redis_url: str, rec: Recording, pool: str, timeout_s: float = 60.0) -> tuple[str, list[RecordedTurn]]:
    from shared.jobs import enqueue
    from shared.redis_conn import connect

    then = recorded_turns(rec)
    sid = f"replay-asr-{uuid.uuid4().hex[:10]}"
    redis = connect(redis_url)
    try:
        pipe = redis.pipeline(transaction=False)
        for frame in recorded_frames(rec):
            copy = msgspec.structs.replace(frame, session=sid)
            pipe.xadd(Keys.audio_in(sid), {ENTRY_FIELD: encode(copy)}, id=frame_entry_id(frame.seq))
        await pipe.execute()
        enqueued: dict[int, float] = {}
        for t in then:
            enqueued[t.turn] = time.time()
            await enqueue(redis, pool, AsrJob(session=sid, turn=t.turn, start_seq=t.start_seq, end_seq=t.end_seq))
        got: dict[int, RecordedTurn] = {}
        last: bytes | str = "0-0"
        deadline = time.monotonic() + timeout_s
        while len(got) < len(then) and time.monotonic() < deadline:
            reply = await xread(redis, {Keys.events(sid): last}, count=100, block_ms=200)
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    msg = decode_entry(fields)
                    if isinstance(msg, Transcript) and msg.final:
                        e2e = (time.time() - enqueued.get(msg.turn, time.time())) * 1000
                        got[msg.turn] = RecordedTurn(msg.turn, msg.text, msg.start_seq, msg.end_seq,
                                                     latency={"asr_ms": msg.asr_ms, "job_ms": round(e2e, 1)})
        if len(got) < len(then):
            raise TimeoutError(f"pool {pool}: {len(then) - len(got)} ASR job(s) unanswered in {timeout_s:.0f}s (workers running?)")
        return sid, [got[t.turn] for t in then]
    finally:
        keys = [*Keys.session_streams(sid)]
        await redis.delete(*keys)
        await redis.aclose()


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a recording made by `voxbus record`")
    p.add_argument("--speed", choices=["1", "2", "max"],
                   help="caller audio timing (default max; 1 with --report, so then and now share one time axis)")
    p.add_argument("--pools", help="pools TOML file (default: $VOXBUS_POOLS, else ops/pools/cpu.toml)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--stage", choices=["asr"], help="re-run only this stage's recorded jobs")
    p.add_argument("--pool", help="with --stage: the pool to run them on")
    p.add_argument("--start-workers", action="store_true", help="start the pools' default CPU workers for the replay")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="OUT.html",
                   help="also write the `voxbus inspect` view of the recorded run (then) and the replayed run (now), side by side")


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from shared.config import load_config
    from shared.redis_conn import redis_url_from_env

    from .stack import start_workers, stop_workers

    rec = load(args.file)
    url = args.redis_url or redis_url_from_env()
    config = load_config(args.pools)
    if args.report and args.stage:
        raise RecordingError("--report shows whole calls side by side: it does not go with --stage")
    speed = args.speed or ("1" if args.report else "max")
    workers = await start_workers(url, config, args.pools) if args.start_workers else []
    report = None
    try:
        if args.stage == "asr":
            if not args.pool:
                raise RecordingError("--stage asr needs --pool POOL")
            config.pool(args.pool)
            sid, now = await replay_asr(url, rec, args.pool)
        else:
            sid, now = await replay_session(url, config, rec, speed)
            if args.report:
                report = await _report(url, rec, sid, args.report)
    finally:
        await stop_workers(workers)
    result = compare(recorded_turns(rec), now)
    result.update({"source_session": rec.session, "replay_session": sid, "stage": args.stage or "all", "speed": speed})
    if report is not None:
        result["report"] = {"path": str(report.path), "bytes": report.size, "summary": report.summary()}
    return result


async def _report(url: str, rec: Recording, sid: str, path: str) -> Any:
    """The inspect view of the recording (then) and of its replay (now), from the replay's session in Redis."""
    from shared.admin.inspect import export_settled, write_report
    from shared.redis_conn import connect

    redis = connect(url)
    try:
        now = await export_settled(redis, sid)
    finally:
        await redis.aclose()
    return write_report([("then", rec), ("now", now)], path,
                        title=f"voxbus replay: session {rec.session} then, replayed as {sid} now")


def run(args: argparse.Namespace) -> int:
    import json

    try:
        result = asyncio.run(_main(args))
    except (RecordingError, TimeoutError) as exc:
        print(f"voxbus replay: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"replay of {result['source_session']} as {result['replay_session']} ({result['stage']}, speed {result['speed']})")
    if "report" in result:
        print(result["report"]["summary"])
    for row in result["turns"]:
        print(f"\nturn {row['index']}  WER {row['transcript_match']:.2f}")
        print(f"  caller then: {row['transcript_then']}\n  caller now:  {row['transcript_now']}")
        if result["stage"] == "all":
            print(f"  agent then:  {row['agent_then']}\n  agent now:   {row['agent_now']}")
        for key, delta in row.get("latency_delta_ms", {}).items():
            print(f"  {key:20} then {row['latency_then'][key]:8.1f}  now {row['latency_now'][key]:8.1f}  delta {delta:+8.1f} ms")
    return 0
