"""`voxbus inspect SESSION|FILE.vbrec [-o report.html]`: one session as a self-contained HTML timeline.

Reads a live or ended session from Redis (as `voxbus record` exports it) or a
recording file, and writes one HTML file with no outside reference: a row per
turn (caller and agent waveforms, VAD, end-of-turn decisions, ASR, LLM tokens,
TTS chunks, jobs, markers), the latency waterfall, the session totals and the
jobs table, with each turn's audio as Opus in a data: URI. `voxbus replay
FILE --report` renders the recorded and the replayed run side by side with
`write_report`.

The parts: `inspect_model` (the types), `inspect_timeline` (recording ->
timeline), `inspect_waterfall` (latency per turn, session totals),
`inspect_audio` (tracks, waveform peaks, Opus), `inspect_rows` and
`inspect_html` (the page) and the page template `inspect_page.html`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol import Keys
from .inspect_audio import RATE, caller_pcm, has_opus, row_media, tracks
from .inspect_html import Side, render
from .inspect_model import TurnRow
from .inspect_timeline import build
from .recording import Recording, RecordingError, export_session, load

if TYPE_CHECKING:
    import redis.asyncio as aioredis

COLUMNS_PER_S = 64  # waveform resolution: about one column per two pixels on a wide screen
MIN_COLUMNS, MAX_COLUMNS = 200, 1600


@dataclass(frozen=True, slots=True)
class Report:
    path: Path
    size: int
    audio_bytes: int
    duration_s: float
    turns: int
    markers: int
    jobs: int

    def summary(self) -> str:
        minutes = max(self.duration_s / 60, 1 / 60)
        audio = (f", audio {self.audio_bytes / 1024:.0f} KiB of Opus" if self.audio_bytes else ", no audio")
        return (f"wrote {self.path} ({self.size / 1024:.0f} KiB{audio}; {self.duration_s:.1f} s of call, "
                f"{self.size / 1024 / minutes:.0f} KiB a minute): {self.turns} turns, {self.markers} markers, {self.jobs} jobs")


def _columns(row: TurnRow) -> int:
    return int(min(MAX_COLUMNS, max(MIN_COLUMNS, (row.t1 - row.t0) * COLUMNS_PER_S)))


def make_side(name: str, rec: Recording, with_audio: bool = True) -> Side:
    """One session's part of a report: its timeline and each row's waveforms and audio."""
    caller = caller_pcm(rec)
    tl = build(rec, caller.origin, len(caller.pcm) / RATE)
    if caller.missing:
        tl.notes.append(caller.missing)
    if not caller.realtime:
        tl.notes.append("The caller's audio was fed faster than it was spoken (a replay at speed 2 or max): its "
                        "waveform and sound follow the frame clock, the events the wall clock, and they do not line up.")
    tr = tracks(rec, tl, caller.pcm)
    return Side(name, tl, [row_media(tr, row, _columns(row), with_audio) for row in tl.rows])


def write_report(recordings: list[tuple[str, Recording]], path: str | Path, title: str | None = None,
                 with_audio: bool = True) -> Report:
    """The HTML report of one recording (name "session"), or of several side by side ("then", "now")."""
    with_audio = with_audio and has_opus()
    sides = [make_side(name, rec, with_audio) for name, rec in recordings]
    if title is None:
        title = "voxbus inspect: " + " / ".join(
            (f"{s.name} " if len(sides) > 1 else "") + f"session {s.timeline.session}" for s in sides)
    html = render(sides, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = html.encode("utf-8")
    out.write_bytes(data)
    return Report(out, len(data), sum(len(m.audio or b"") for s in sides for m in s.media),
                  sum(s.timeline.duration for s in sides), sum(len(s.timeline.rows) for s in sides),
                  sum(len(s.timeline.markers) for s in sides), sum(len(s.timeline.jobs) for s in sides))


async def export_settled(redis: aioredis.Redis, sid: str, quiet_s: float = 0.5, timeout_s: float = 5.0) -> Recording:
    """Export a session that just ended, once its events stopped growing: workers report how a
    job ran (`JobRun`) when they are done with it, a moment after the bridge saw the result."""
    deadline = time.monotonic() + timeout_s
    length, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_length = int(await redis.xlen(Keys.events(sid)))
        if now_length != length:
            length, since = now_length, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        await asyncio.sleep(0.1)
    return await export_session(redis, sid)


async def fetch(source: str, redis_url: str | None) -> Recording:
    """A recording file, or the session of that id exported from Redis."""
    if source.endswith(".vbrec") or Path(source).is_file():
        return load(source)
    from ..redis_conn import connect, redis_url_from_env

    redis = connect(redis_url or redis_url_from_env())
    try:
        return await export_session(redis, source)
    finally:
        await redis.aclose()


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SESSION|FILE.vbrec", help="a session id (read from Redis) or a `voxbus record` file")
    p.add_argument("-o", "--output", help="the HTML file to write (default: voxbus-SESSION.html)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--no-audio", action="store_true", help="leave the playable audio out (a smaller file)")


def run(args: argparse.Namespace) -> int:
    try:
        rec = asyncio.run(fetch(args.source, args.redis_url))
    except (RecordingError, ValueError) as exc:
        print(f"voxbus inspect: {exc}", file=sys.stderr)
        return 1
    if not args.no_audio and not has_opus():
        print("voxbus inspect: PyAV with libopus is not installed (the webrtc extra): the report has no audio",
              file=sys.stderr)
    report = write_report([("session", rec)], args.output or f"voxbus-{rec.session}.html", with_audio=not args.no_audio)
    print(report.summary())
    return 0
