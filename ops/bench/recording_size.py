"""Bytes per call-minute of a recording: in Redis (caller audio as PCM and as Opus) and in the archive.

Default: --callers callers each push --seconds of the capacity bench's kind of
caller audio (Piper sentences with 0.8-2.5 s pauses, looped, under a fresh
-70 dBFS noise floor) through an in-process bridge (no VAD model) into a private
redis-server, once with `audio_codec = "pcm"` (the anchor: what bridges wrote
before) and once with "opus". Audio goes in faster than real time: sizes do
not depend on the pace. Per codec: MEMORY USAGE (SAMPLES 0: exact) of audio.in
and of all the session's keys per call-minute, and the recording file per
call-minute as the archive writes it (zstd 3), gzip -6, and uncompressed.

--session SID [--redis-url URL]: the same figures for one recorded call
(e.g. a `voxbus demo` call, agent audio, events and tokens included), per stream.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis.asyncio as aioredis

from shared.admin.recording import dumps, export_session
from shared.protocol import FRAME_MS, Keys

SENTENCES = ("The quick brown fox jumps over the lazy dog.",
             "I would like to book a table for two people tomorrow evening.",
             "What time does the next train to Boston leave?",
             "Can you turn off the lights in the kitchen?",
             "How much does it cost to ship a package overseas?",
             "Thank you very much for your help.")


def caller_track(seed: int = 1) -> np.ndarray:
    from tests.support.frames_only import caller_track as track

    return track(seed, SENTENCES)


async def key_bytes(redis: aioredis.Redis, sid: str) -> dict[str, int]:
    keys = {"audio.in": Keys.audio_in(sid), "events": Keys.events(sid), "tokens": Keys.tokens(sid),
            "audio.out": Keys.audio_out(sid), "ctx": Keys.ctx(sid), "meta": Keys.meta(sid), "claim": Keys.claim(sid),
            "ended": Keys.ended(sid)}
    return {name: int(await redis.memory_usage(key, samples=0) or 0) for name, key in keys.items()}


def file_sizes(rec: Any) -> dict[str, int]:
    return {"zstd": len(dumps(rec)), "gzip": len(gzip.compress(dumps(rec, compress=False), 6)),
            "none": len(dumps(rec, compress=False))}


def per_minute(values: dict[str, int], minutes: float) -> dict[str, int]:
    return {k: round(v / minutes) for k, v in values.items()}


async def synthetic(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.core import Bridge
    from shared.admin.embedded_redis import EmbeddedRedis
    from tests.support.bridge import pools_config
    from tests.support.frames_only import NoVad

    track = caller_track()
    server = EmbeddedRedis()
    server.start()
    await server.ready()
    redis = aioredis.Redis.from_url(server.url)
    out: dict[str, Any] = {"callers": args.callers, "seconds": args.seconds}
    try:
        for codec in ("pcm", "opus"):
            bridge = Bridge(server.url, pools_config(audio_codec=codec, max_sessions=args.callers + 4), vad_engine=NoVad())
            await bridge.start()
            sessions = [await bridge.open_session(f"size-{codec}-{i}", transport="bench") for i in range(args.callers)]
            samples = int(args.seconds * 16_000)
            offsets = [(i * 7919) % len(track) for i in range(args.callers)]
            rng = np.random.default_rng(2)
            for at in range(0, samples, 1600):
                for s, off in zip(sessions, offsets):
                    # The noise floor is drawn afresh: a looped track would repeat itself byte for byte,
                    # which a compressor with a long window (zstd) finds and a real call never has.
                    chunk = track[(np.arange(at, at + 1600) + off) % len(track)] + rng.normal(0.0, 10.0, 1600)
                    s.push_audio(np.clip(np.round(chunk), -32768, 32767).astype(np.int16))
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.5)
            minutes = samples / 16_000 / 60
            sizes = [await key_bytes(redis, s.id) for s in sessions]
            recs = [await export_session(redis, s.id) for s in sessions]
            frames = len(recs[0].streams["audio.in"])
            mean = {k: int(np.mean([s[k] for s in sizes])) for k in sizes[0]}
            files = {k: int(np.mean([file_sizes(r)[k] for r in recs[:5]])) for k in ("zstd", "gzip", "none")}
            out[codec] = {"frames_per_call": frames, "redis_bytes_per_call_minute": per_minute(mean, minutes),
                          "redis_bytes_per_frame_audio_in": round(mean["audio.in"] / frames, 1),
                          "file_bytes_per_call_minute": per_minute(files, minutes)}
            await bridge.aclose()
            for s in sessions:
                await redis.delete(*Keys.session_keys(s.id), Keys.claim(s.id))
        pcm, opus = out["pcm"]["redis_bytes_per_call_minute"]["audio.in"], out["opus"]["redis_bytes_per_call_minute"]["audio.in"]
        out["audio_in_ratio_pcm_over_opus"] = round(pcm / opus, 2)
        out["used_memory"] = int((await redis.info("memory"))["used_memory"])
    finally:
        await redis.aclose()
        server.stop()
    return out


async def one_session(args: argparse.Namespace) -> dict[str, Any]:
    from shared.redis_conn import connect, redis_url_from_env

    redis = connect(args.redis_url or redis_url_from_env())
    try:
        rec = await export_session(redis, args.session)
        sizes = await key_bytes(redis, args.session)
    finally:
        await redis.aclose()
    minutes = len(rec.streams["audio.in"]) * FRAME_MS / 1000 / 60
    return {"session": args.session, "call_minutes": round(minutes, 3),
            "entries": {k: len(v) for k, v in rec.streams.items()},
            "redis_bytes": sizes, "redis_bytes_per_call_minute": per_minute(sizes, minutes),
            "redis_total_per_call_minute": round(sum(sizes.values()) / minutes),
            "file_bytes": file_sizes(rec), "file_bytes_per_call_minute": per_minute(file_sizes(rec), minutes),
            "measured_at": time.time()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--session", help="measure this recorded session instead")
    p.add_argument("--redis-url", help="with --session (default: $REDIS_URL)")
    p.add_argument("--json", action="store_true", help="accepted for symmetry with the other benchmarks: the output is JSON")
    args = p.parse_args()
    print(json.dumps(asyncio.run(one_session(args) if args.session else synthetic(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
