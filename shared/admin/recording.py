"""Sessions as recordings: every session's streams are its recording.

`voxbus record SID -o FILE` exports a session (all four streams with their
entry ids, the context list and the session metadata) to one self-describing,
versioned msgpack file that can move between machines; `voxbus sessions`
lists recent sessions with duration, turns and outcome. Retention: stream
MAXLEN bounds while live, and a TTL on every key once the session ends.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import msgspec

from ..protocol import (
    AudioFrame,
    Interrupt,
    JobFailed,
    Keys,
    ProtocolError,
    SessionMeta,
    Transcript,
    TurnMark,
    decode,
    decode_as,
)

FORMAT = "voxbus.recording/1"
STREAM_KINDS = ("audio.in", "events", "tokens", "audio.out")


class Recording(msgspec.Struct, kw_only=True):
    format: str
    session: str
    exported_at: float
    meta: bytes | None = None
    ctx: list[bytes] = []
    streams: dict[str, list[tuple[str, bytes]]] = {}  # kind -> [(entry id, encoded message)]

    def messages(self, kind: str) -> list:
        out = []
        for _, data in self.streams.get(kind, []):
            try:
                out.append(decode(data))
            except ProtocolError:
                continue
        return out


class RecordingError(ValueError):
    pass


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def export_session(redis, sid: str) -> Recording:
    streams: dict[str, list[tuple[str, bytes]]] = {}
    for kind, key in zip(STREAM_KINDS, Keys.session_streams(sid)):
        entries = []
        last = "-"
        while True:
            batch = await redis.xrange(key, last, "+", count=5000)
            batch = [e for e in batch if _s(e[0]) != last]
            if not batch:
                break
            entries += [(_s(eid), fields.get(b"m", b"")) for eid, fields in batch]
            last = _s(batch[-1][0])
        streams[kind] = entries
    if not any(streams.values()):
        raise RecordingError(f"session {sid!r} has nothing recorded (unknown, or expired)")
    return Recording(format=FORMAT, session=sid, exported_at=time.time(), meta=await redis.get(Keys.meta(sid)),
                     ctx=list(await redis.lrange(Keys.ctx(sid), 0, -1)), streams=streams)


def save(rec: Recording, path: str | Path) -> int:
    data = msgspec.msgpack.encode(rec)
    Path(path).write_bytes(data)
    return len(data)


def load(path: str | Path) -> Recording:
    try:
        rec = msgspec.msgpack.decode(Path(path).read_bytes(), type=Recording)
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RecordingError(f"{path}: not a voxbus recording: {exc}") from None
    if rec.format != FORMAT:
        raise RecordingError(f"{path}: format {rec.format!r}, this voxbus reads {FORMAT!r}")
    return rec


async def summarize(redis, sid: str, started: float) -> dict:
    """Duration, turns and outcome of one session, from its streams."""
    first = await redis.xrange(Keys.audio_in(sid), count=1)
    last = await redis.xrevrange(Keys.audio_in(sid), count=1)
    duration = 0.0
    try:
        if first and last:
            duration = decode_as(last[0][1][b"m"], AudioFrame).ts - decode_as(first[0][1][b"m"], AudioFrame).ts
    except (ProtocolError, KeyError):
        pass
    turns = interrupts = failures = false_interruptions = 0
    for _, fields in await redis.xrange(Keys.events(sid)):
        try:
            msg = decode(fields.get(b"m", b""))
        except ProtocolError:
            continue
        if isinstance(msg, Transcript) and msg.final and msg.text.strip():
            turns += 1
        elif isinstance(msg, Interrupt):
            interrupts += 1
        elif isinstance(msg, JobFailed):
            failures += 1
        elif isinstance(msg, TurnMark) and msg.mark == "false_interruption":
            false_interruptions += 1
    live = await redis.ttl(Keys.audio_in(sid)) == -1
    transport = ""
    meta = await redis.get(Keys.meta(sid))
    if meta:
        try:
            transport = decode_as(meta, SessionMeta).transport
        except ProtocolError:
            pass
    outcome = "live" if live else ("failed jobs" if failures else "ended")
    return {"session": sid, "started": started, "duration_s": round(duration, 1), "turns": turns,
            "interrupts": interrupts, "false_interruptions": false_interruptions, "failed_jobs": failures,
            "transport": transport, "outcome": outcome}


# ------------------------------------------------------------------ CLI: voxbus record / sessions

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", help="session id")
    p.add_argument("-o", "--output", required=True, help="file to write (.vbrec)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")


def run(args: argparse.Namespace) -> int:
    async def main() -> int:
        from ..redis_conn import connect, redis_url_from_env

        redis = connect(args.redis_url or redis_url_from_env())
        try:
            rec = await export_session(redis, args.session)
        except RecordingError as exc:
            print(f"voxbus record: {exc}")
            return 1
        finally:
            await redis.aclose()
        size = save(rec, args.output)
        counts = ", ".join(f"{k} {len(v)}" for k, v in rec.streams.items())
        print(f"wrote {args.output} ({size / 1024:.0f} KiB): {counts}, context {len(rec.ctx)}")
        return 0

    return asyncio.run(main())


def add_sessions_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")


def run_sessions(args: argparse.Namespace) -> int:
    async def main() -> int:
        import orjson

        from ..redis_conn import connect, redis_url_from_env

        redis = connect(args.redis_url or redis_url_from_env())
        try:
            rows = [await summarize(redis, _s(sid), started)
                    for sid, started in await redis.zrevrange(Keys.SESSIONS, 0, args.limit - 1, withscores=True)]
        finally:
            await redis.aclose()
        if args.json:
            print(orjson.dumps(rows).decode())
            return 0
        print(f"{'session':20} {'started':19} {'dur s':>6} {'turns':>5} {'intr':>4} {'outcome':12} transport")
        for r in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
            print(f"{r['session']:20} {started:19} {r['duration_s']:6.1f} {r['turns']:5d} {r['interrupts']:4d} {r['outcome']:12} {r['transport']}")
        return 0

    return asyncio.run(main())
