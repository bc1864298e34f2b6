"""Sessions as recordings: every session's streams are its recording.

`voxbus record SID -o FILE` exports a session (all four streams with their
entry ids, the context list and the session metadata) to one self-describing,
versioned msgpack file (`voxbus.recording/1`) that can move between machines.
The file is compressed as a whole, with zstd when the `zstandard` package is
installed (the `archive` extra) and gzip otherwise: the caller's audio is
Opus already, and what is left (agent PCM, events, tokens) shrinks about 2x;
zstd at level 3 is as small as gzip -6 (1-2 % smaller on our recordings) for a
quarter of its CPU. `load` tells the three apart by their first bytes, so
files written before compression (plain msgpack) still load.

`load_recording(ref)` is how every reader gets a recording: a file, or a
session id read from Redis while Redis has it, else from the archive
(shared.admin.archive), so `voxbus record` and `voxbus sessions` work the same
before and after a call's keys expire. Retention: stream MAXLEN bounds while
live; once the call ends its keys expire (README "Recording and replay", "Sizing Redis").
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import time
import zlib
from pathlib import Path
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis

from ..protocol import (
    AudioFrame,
    Interrupt,
    JobFailed,
    Keys,
    OpusFrame,
    ProtocolError,
    SessionMeta,
    Transcript,
    TurnMark,
    decode,
    decode_as,
    validate_session_id,
)
from ..redis_conn import TRANSIENT_ERRORS, xrange, xrevrange

FORMAT = "voxbus.recording/1"
STREAM_KINDS = ("audio.in", "events", "tokens", "audio.out")
ZSTD_LEVEL = 3
EXPORT_BATCH = 1000  # entries per XRANGE: 1-2 ms of the event loop each
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class Recording(msgspec.Struct, kw_only=True):
    format: str
    session: str
    exported_at: float
    meta: bytes | None = None
    ctx: list[bytes] = []
    streams: dict[str, list[tuple[str, bytes]]] = {}  # kind -> [(entry id, encoded message)]

    def messages(self, kind: str) -> list[Any]:
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


async def export_session(redis: aioredis.Redis, sid: str) -> Recording:
    streams: dict[str, list[tuple[str, bytes]]] = {}
    for kind, key in zip(STREAM_KINDS, Keys.session_streams(sid)):
        entries = []
        last = "-"
        while True:
            # Small batches: a bridge exports while its event loop serves live calls.
            batch = [e for e in await xrange(redis, key, last, "+", count=EXPORT_BATCH) if _s(e[0]) != last]
            if not batch:
                break
            entries += [(_s(eid), fields.get(b"m", b"")) for eid, fields in batch]
            last = _s(batch[-1][0])
        streams[kind] = entries
    if not any(streams.values()):
        raise RecordingError(f"session {sid!r} has nothing recorded (unknown, or expired)")
    meta = cast(bytes | None, await redis.get(Keys.meta(sid)))
    ctx = cast(list[bytes], await redis.lrange(Keys.ctx(sid), 0, -1))
    return Recording(format=FORMAT, session=sid, exported_at=time.time(), meta=meta, ctx=ctx, streams=streams)


# ------------------------------------------------------------------ the file: msgpack, compressed

def _zstd() -> Any | None:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def dumps(rec: Recording, *, compress: bool = True) -> bytes:
    data = msgspec.msgpack.encode(rec)
    if not compress:
        return data
    zstd = _zstd()
    if zstd is not None:
        return cast(bytes, zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
    return gzip.compress(data, compresslevel=6, mtime=0)


def loads(data: bytes, where: str = "recording") -> Recording:
    """A recording from the bytes of a file: zstd, gzip or plain msgpack (the older files)."""
    if data[:4] == _ZSTD_MAGIC:
        zstd = _zstd()
        if zstd is None:
            raise RecordingError(f"{where}: compressed with zstd; install it: pip install 'voxbus[archive]'")
        try:
            data = zstd.ZstdDecompressor().decompressobj().decompress(data)
        except zstd.ZstdError as exc:
            raise RecordingError(f"{where}: damaged zstd data: {exc}") from None
    elif data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise RecordingError(f"{where}: damaged gzip data: {exc}") from None
    try:
        rec = msgspec.msgpack.decode(data, type=Recording)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RecordingError(f"{where}: not a voxbus recording: {exc}") from None
    if rec.format != FORMAT:
        raise RecordingError(f"{where}: format {rec.format!r}, this voxbus reads {FORMAT!r}")
    return rec


def save(rec: Recording, path: str | Path, *, compress: bool = True) -> int:
    data = dumps(rec, compress=compress)
    Path(path).write_bytes(data)
    return len(data)


def load(path: str | Path) -> Recording:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return loads(data, str(path))


async def load_recording(ref: str, redis_url: str | None = None, archive_url: str | None = None) -> Recording:
    """A recording by reference: a file (an existing path, or a name ending in .vbrec), else a session id,
    exported from Redis while Redis has it, else read from the archive. `archive_url` None: the
    default ($VOXBUS_ARCHIVE_URL, else the pools file's); "": no archive."""
    from .archive import RECORDING_SUFFIX, ArchiveError, default_archive_url, open_archive

    if ref.endswith(RECORDING_SUFFIX) or Path(ref).is_file():
        return load(ref)
    try:
        sid = validate_session_id(ref)
    except ProtocolError:
        raise RecordingError(f"{ref!r} is neither a recording file nor a session id") from None
    from ..redis_conn import connect, redis_url_from_env

    redis = connect(redis_url or redis_url_from_env())
    unreachable = ""
    try:
        return await export_session(redis, sid)
    except RecordingError:
        pass
    except TRANSIENT_ERRORS as exc:  # the archive may still have it
        unreachable = f" (Redis unreachable: {exc})"
    finally:
        await redis.aclose()
    url = default_archive_url() if archive_url is None else archive_url
    if not url:
        raise RecordingError(f"session {sid!r}: nothing in Redis{unreachable}, and no archive configured "
                             "(--archive URL or $VOXBUS_ARCHIVE_URL)")
    try:
        data = await asyncio.to_thread(open_archive(url).get, sid)
    except ArchiveError as exc:
        raise RecordingError(str(exc)) from None
    if data is None:
        raise RecordingError(f"session {sid!r}: nothing in Redis{unreachable} nor in the archive {url}")
    return loads(data, f"{url}/{sid}{RECORDING_SUFFIX}")


# ------------------------------------------------------------------ summaries

async def recent_sessions(redis: aioredis.Redis, limit: int) -> list[tuple[str, float]]:
    """The newest sessions (id, start time), newest first."""
    rows = cast(list[tuple[bytes, float]], await redis.zrevrange(Keys.SESSIONS, 0, limit - 1, withscores=True))
    return [(_s(sid), float(started)) for sid, started in rows]


def _frame_ts(data: bytes) -> float:
    return float(decode_as(data, AudioFrame, OpusFrame).ts)


def _transport(meta: bytes | None) -> str:
    if meta:
        try:
            return str(decode_as(meta, SessionMeta).transport)
        except ProtocolError:
            pass
    return ""


def _summary(sid: str, started: float, duration: float, events: list[bytes], transport: str, live: bool) -> dict[str, Any]:
    turns = interrupts = failures = false_interruptions = 0
    for data in events:
        try:
            msg = decode(data)
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
    outcome = "live" if live else ("failed jobs" if failures else "ended")
    return {"session": sid, "started": started, "duration_s": round(duration, 1), "turns": turns,
            "interrupts": interrupts, "false_interruptions": false_interruptions, "failed_jobs": failures,
            "transport": transport, "outcome": outcome}


async def summarize(redis: aioredis.Redis, sid: str, started: float) -> dict[str, Any]:
    """Duration, turns and outcome of one session, from its streams."""
    first = await xrange(redis, Keys.audio_in(sid), count=1)
    last = await xrevrange(redis, Keys.audio_in(sid), count=1)
    duration = 0.0
    try:
        if first and last:
            duration = _frame_ts(last[0][1][b"m"]) - _frame_ts(first[0][1][b"m"])
    except (ProtocolError, KeyError):
        pass
    events = [fields.get(b"m", b"") for _, fields in await xrange(redis, Keys.events(sid))]
    live = await redis.ttl(Keys.audio_in(sid)) == -1
    meta = cast(bytes | None, await redis.get(Keys.meta(sid)))
    return _summary(sid, started, duration, events, _transport(meta), live)


def summarize_recording(rec: Recording) -> dict[str, Any]:
    """The same summary as `summarize`, from a recording (what the archive's index keeps)."""
    frames = rec.streams.get("audio.in", [])
    duration = 0.0
    try:
        if frames:
            duration = _frame_ts(frames[-1][1]) - _frame_ts(frames[0][1])
    except ProtocolError:
        pass
    started = rec.exported_at
    if rec.meta:
        try:
            started = decode_as(rec.meta, SessionMeta).ts
        except ProtocolError:
            pass
    return _summary(rec.session, started, duration, [d for _, d in rec.streams.get("events", [])],
                    _transport(rec.meta), live=False)


# ------------------------------------------------------------------ CLI: voxbus record / sessions

_ARCHIVE_HELP = "the archive to read when Redis no longer has a session (default: $VOXBUS_ARCHIVE_URL, else the pools file's)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", help="session id")
    p.add_argument("-o", "--output", required=True, help="file to write (.vbrec)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--archive", metavar="URL", help=_ARCHIVE_HELP)


def run(args: argparse.Namespace) -> int:
    try:
        rec = asyncio.run(load_recording(args.session, args.redis_url, args.archive))
    except RecordingError as exc:
        print(f"voxbus record: {exc}")
        return 1
    size = save(rec, args.output)
    counts = ", ".join(f"{k} {len(v)}" for k, v in rec.streams.items())
    print(f"wrote {args.output} ({size / 1024:.0f} KiB): {counts}, context {len(rec.ctx)}")
    return 0


def add_sessions_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--archive", metavar="URL", help="also list archived sessions from this archive "
                                                    "(default: $VOXBUS_ARCHIVE_URL, else the pools file's)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")


async def list_sessions(redis: aioredis.Redis, archive_url: str, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` sessions: those Redis still holds, then those only the archive has.
    Each row says where the recording is (`stored`: redis, redis+archive or archive)."""
    from .archive import open_archive

    rows: dict[str, dict[str, Any]] = {}
    for sid, started in await recent_sessions(redis, limit):
        if not await redis.exists(*Keys.session_streams(sid)):
            continue  # expired: the archive's row (if any) stands for it
        row = await summarize(redis, sid, started)
        row["stored"] = "redis+archive" if await redis.exists(Keys.archived(sid)) else "redis"
        rows[sid] = row
    if archive_url:
        for row in await asyncio.to_thread(open_archive(archive_url).list, limit):
            sid = str(row.get("session", ""))
            if sid in rows:
                rows[sid]["stored"] = "redis+archive"
            elif sid:
                rows[sid] = {**row, "stored": "archive"}
    return sorted(rows.values(), key=lambda r: -float(r.get("started") or 0.0))[:limit]


def run_sessions(args: argparse.Namespace) -> int:
    async def main() -> int:
        import orjson

        from ..redis_conn import connect, redis_url_from_env
        from .archive import default_archive_url

        redis = connect(args.redis_url or redis_url_from_env())
        try:
            rows = await list_sessions(redis, default_archive_url() if args.archive is None else args.archive, args.limit)
        finally:
            await redis.aclose()
        if args.json:
            print(orjson.dumps(rows).decode())
            return 0
        print(f"{'session':20} {'started':19} {'dur s':>6} {'turns':>5} {'intr':>4} {'outcome':12} {'stored':13} transport")
        for r in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
            print(f"{r['session']:20} {started:19} {r['duration_s']:6.1f} {r['turns']:5d} {r['interrupts']:4d} "
                  f"{r['outcome']:12} {r['stored']:13} {r['transport']}")
        return 0

    return asyncio.run(main())
