"""Archiving recordings when calls end (shared/admin/archive.py, shared/admin/archiving.py): targets, crash safety, retention.

- Targets: the directory target (atomic writes: a failed write leaves the old
  object and no temporary file) and the S3 target against moto's S3 server
  (`ThreadedMotoServer` on loopback, real HTTP through boto3). No real S3
  server installs here: MinIO, Garage and SeaweedFS are in neither Debian nor
  PyPI as servers, and Debian's Ceph radosgw needs a running Ceph cluster
  (monitors and OSDs), so moto's server is the most faithful local S3 we can
  run. Its endpoint reaches boto3 through AWS_ENDPOINT_URL_S3, as any
  S3-compatible server's would.
- Files: compressed recordings load, and so do the uncompressed files of
  older versions.
- Bridges (in-process, real Opus frames of Piper speech, no VAD model) on a
  private Redis per test, so that sweeping sees only the test's sessions: a
  closed call is archived once and its keys expire after `retention_s`; a
  bridge that dies without closing leaves its call to another process's sweep
  (`voxbus archive --sweep` in a subprocess); racing sweepers archive each call
  once; a live call archived on demand is a snapshot that the end replaces.
- The exporter's memory and backlog figures equal what Redis says.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from bridge.core import SESSION_TTL_S, Bridge
from shared.admin import archiving
from shared.admin.archive import ArchiveError, FileArchive, S3Archive, open_archive
from shared.admin.archiving import Outcome, archive_session, reap, sweep
from shared.admin.embedded_redis import EmbeddedRedis
from shared.admin.exporter import collect_memory
from shared.admin.recording import (
    Recording,
    RecordingError,
    dumps,
    load,
    load_recording,
    loads,
    save,
)
from shared.config import ARCHIVE_URL_ENV, ConfigError, archive_url_of, parse_config
from shared.protocol import Keys
from tests.engines.speech import pad_silence, synthesize_16k
from tests.support.bridge import pools_config
from tests.support.frames_only import NoVad
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[1]
SPEECH = "Hello, I would like to know when the next train to Boston leaves."


class CountingArchive(FileArchive):
    """A directory archive that counts the recordings written, per session."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: Counter[str] = Counter()

    def put(self, sid: str, data: bytes, summary: dict[str, Any] | None = None) -> None:
        self.puts[sid] += 1
        super().put(sid, data, summary)


_speech: np.ndarray | None = None


def speech() -> np.ndarray:
    global _speech
    if _speech is None:
        _speech = pad_silence(synthesize_16k(SPEECH), 0.3, 0.5)
    return _speech


async def start_bridge(url: str, **bridge: Any) -> Bridge:
    b = Bridge(url, pools_config(**bridge), vad_engine=NoVad())
    await b.start()
    return b


async def archiving_bridge(url: str, archive_url: str, retention_s: float) -> Bridge:
    """A bridge with an archive that archives a call as soon as it ends (no settling time)."""
    b = await start_bridge(url, archive_url=archive_url, retention_s=retention_s)
    assert b.archiver is not None
    b.archiver.settle_s = 0.0
    return b


async def talk(b: Bridge, sid: str, seconds: float = 1.0) -> int:
    """Open `sid` and push `seconds` of speech (100 ms at a time, 10x faster than real time); returns its frames."""
    session = await b.open_session(sid, transport="test")
    pcm = speech()[: int(seconds * 16_000)]
    for at in range(0, len(pcm), 1600):
        session.push_audio(pcm[at:at + 1600])
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the publisher's last round trip
    return len(pcm) // 320


@pytest.fixture
async def private(embedded_redis: EmbeddedRedis) -> Any:
    client = aioredis.Redis.from_url(embedded_redis.url)
    try:
        yield embedded_redis.url, client
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------- targets and files

def test_directory_archive_round_trip_and_atomic_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "arch ive"
    for url in (root.as_uri(), str(root)):
        assert isinstance(open_archive(url), FileArchive) and open_archive(url).root == root
    a = open_archive(root.as_uri())
    assert a.get("nope") is None and not a.exists("nope") and a.list(5) == []
    a.put("call-1", b"one", {"started": 100.0, "turns": 1})
    a.put("call-2", b"two", {"started": 200.0, "turns": 2})
    a.put("call-1", b"ONE", {"started": 100.0, "turns": 3})  # written again: replaced, not doubled
    assert a.get("call-1") == b"ONE" and a.exists("call-2")
    assert [(r["session"], r["turns"], r["bytes"]) for r in a.list(10)] == [("call-2", 2, 3), ("call-1", 3, 3)]
    assert [r["session"] for r in a.list(1)] == ["call-2"]  # newest first

    def crash(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(ArchiveError, match="No space left"):
        a.put("call-1", b"half")
    assert a.get("call-1") == b"ONE"
    assert sorted(p.name for p in root.iterdir()) == ["call-1.vbrec", "call-2.vbrec", "index"]  # no temp file left


def test_archive_urls_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("ftp://host/x", "file://relative/dir", "s3:///prefix-without-bucket"):
        with pytest.raises(ConfigError, match="archive_url"):
            parse_config({"pools": {}, "bridge": {"archive_url": bad}}, "p.toml")
    with pytest.raises(ConfigError, match="retention_s"):
        parse_config({"pools": {}, "bridge": {"retention_s": 0}}, "p.toml")
    cfg = parse_config({"pools": {}, "bridge": {"archive_url": "s3://calls/prod", "retention_s": 300}}, "p.toml")
    assert archive_url_of(cfg.bridge) == "s3://calls/prod"
    monkeypatch.setenv(ARCHIVE_URL_ENV, "/var/lib/voxbus/archive")
    assert archive_url_of(cfg.bridge) == "/var/lib/voxbus/archive"  # the deployment's environment wins
    monkeypatch.setenv(ARCHIVE_URL_ENV, "gs://elsewhere")
    with pytest.raises(ConfigError, match=ARCHIVE_URL_ENV):
        archive_url_of(cfg.bridge)
    s3 = open_archive("s3://calls/prod/")
    assert isinstance(s3, S3Archive) and (s3.bucket, s3.prefix) == ("calls", "prod")


def test_recordings_are_compressed_and_older_files_still_load(tmp_path: Path) -> None:
    import gzip

    rec = Recording(format="voxbus.recording/1", session="s-1", exported_at=1.0,
                    streams={"audio.in": [("1-0", b"\x00" * 4000)], "events": [], "tokens": [], "audio.out": []})
    packed = dumps(rec)
    assert packed[:4] == b"\x28\xb5\x2f\xfd" and len(packed) < 200  # zstd
    plain = tmp_path / "old.vbrec"
    save(rec, plain, compress=False)  # what voxbus wrote before recordings were compressed
    assert load(plain) == rec and loads(packed) == rec
    assert loads(gzip.compress(dumps(rec, compress=False))) == rec
    for junk in (b"\x28\xb5\x2f\xfdjunk", b"\x1f\x8bjunk", b"junk"):
        with pytest.raises(RecordingError):
            loads(junk)


def test_s3_archive_against_moto_server(monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    from shared.admin.embedded_redis import free_port

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in (("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                            ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(name, value)
        boto3.session.Session().client("s3").create_bucket(Bucket="calls")
        a = open_archive("s3://calls/prod/2026")
        assert a.get("nope") is None and not a.exists("nope") and a.list(5) == []
        a.put("call-1", b"\x00one", {"started": 100.0})
        a.put("call-2", b"\x00two", {"started": 200.0})
        assert a.get("call-1") == b"\x00one" and a.exists("call-2")
        assert [r["session"] for r in a.list(10)] == ["call-2", "call-1"]
        keys = sorted(o["Key"] for o in boto3.session.Session().client("s3").list_objects_v2(Bucket="calls")["Contents"])
        assert keys[:2] == ["prod/2026/call-1.vbrec", "prod/2026/call-2.vbrec"]
        with pytest.raises(ArchiveError, match="NoSuchBucket"):
            open_archive("s3://no-such-bucket").put("call-1", b"x")
    finally:
        server.stop()


# ----------------------------------------------------------------------------- bridges

async def test_a_closed_call_is_archived_once_and_its_keys_expire(private: Any, tmp_path: Path) -> None:
    url, redis = private
    archive_url = (tmp_path / "archive").as_uri()
    b = await archiving_bridge(url, archive_url, retention_s=2.0)
    try:
        frames = await talk(b, "call-closed")
        assert await redis.zscore(Keys.ARCHIVE_PENDING, "call-closed") is not None
        await b.close_session("call-closed")
        await wait_until(lambda: redis.exists(Keys.archived("call-closed")), timeout=20, what="archived marker")
        mark = json.loads(await redis.get(Keys.archived("call-closed")))
        assert mark["by"] == b.id and mark["url"] == archive_url and mark["bytes"] > 0
        assert await redis.zscore(Keys.ARCHIVE_PENDING, "call-closed") is None
        assert 0 < await redis.zscore(Keys.ARCHIVE_EXPIRING, "call-closed") - time.time() <= 2
        assert 0 < await redis.ttl(Keys.audio_in("call-closed")) <= 2
        assert await redis.ttl(Keys.claim("call-closed")) > SESSION_TTL_S  # an id is never reused
        archived = loads(open_archive(archive_url).get("call-closed") or b"")
        assert len(archived.streams["audio.in"]) == frames and archived.meta
        await wait_until(lambda: _gone(redis, "call-closed"), timeout=10, what="the session's keys to expire")
        again = await load_recording("call-closed", url, archive_url)  # Redis has nothing: the archive answers
        assert again.streams == archived.streams
        out = await asyncio.to_thread(_voxbus, url, "sessions", "--json", "--archive", archive_url)
        row = {r["session"]: r for r in json.loads(out)}["call-closed"]
        assert row["stored"] == "archive" and row["duration_s"] > 0  # frames were pushed faster than real time
        with pytest.raises(RecordingError, match="nor in the archive"):
            await load_recording("never-was", url, archive_url)
    finally:
        await b.aclose()


async def test_retained_keys_are_deleted_when_their_retention_is_up(private: Any, tmp_path: Path) -> None:
    """Among a month of 30-day claims Redis would keep expired recordings in memory (the active expiry
    keeps stale keys under ~10 % of all keys with a TTL: shared/admin/archiving.py); `reap` deletes them."""
    url, redis = private
    pipe = redis.pipeline(transaction=False)
    for i in range(20_000):
        pipe.set(Keys.claim(f"old-{i}"), "bridge-gone", ex=30 * 86400)
    await pipe.execute()
    b = await archiving_bridge(url, (tmp_path / "a").as_uri(), retention_s=1.0)
    await talk(b, "call-reaped")
    await b.close_session("call-reaped")
    await wait_until(lambda: redis.exists(Keys.archived("call-reaped")), timeout=20, what="archived marker")
    await b.aclose()  # no bridge left to reap: the test does
    await asyncio.sleep(2.0)
    before = await redis.dbsize()
    assert await reap(redis) == 1
    # DBSIZE counts keys held, expired or not: the claims, the call's own, the sessions index; nothing else of the call.
    assert await redis.dbsize() == 20_002
    assert not await redis.zcard(Keys.ARCHIVE_EXPIRING)
    print(f"\nkeys of the call still in memory 1 s past their TTL, before reap: {before - 20_002}")


async def test_without_an_archive_keys_stay_a_day(private: Any) -> None:
    url, redis = private
    b = await start_bridge(url)
    try:
        await talk(b, "call-kept", 0.3)
        await b.close_session("call-kept")
        assert b.archiver is None
        assert SESSION_TTL_S - 60 < await redis.ttl(Keys.audio_in("call-kept")) <= SESSION_TTL_S
        assert await redis.exists(Keys.ended("call-kept")) and not await redis.zcard(Keys.ARCHIVE_PENDING)
    finally:
        await b.aclose()


async def test_a_dead_bridges_call_is_archived_by_another_process(private: Any, tmp_path: Path) -> None:
    """The bridge stops without closing its call (its tasks end, nothing is closed or marked, the way a
    kill -9 leaves Redis); its heartbeat is deleted as it would expire HEARTBEAT_TTL_S later. Two
    `voxbus archive --sweep` processes race for it: one archives it, once."""
    url, redis = private
    archive_url = (tmp_path / "archive").as_uri()
    dead = await start_bridge(url, archive_url=archive_url, retention_s=30.0)
    frames = await talk(dead, "call-orphan")
    await dead.tasks.aclose()  # dies: no close_session, no drain, no heartbeat any more
    await dead.redis.aclose()
    await redis.delete(Keys.bridge(dead.id))
    assert await redis.ttl(Keys.audio_in("call-orphan")) == -1 and not await redis.exists(Keys.ended("call-orphan"))
    await asyncio.sleep(1.0)  # the caller's last frame is older than --orphan-after

    sweeps = await asyncio.gather(*(asyncio.to_thread(_voxbus, url, "archive", "--sweep", "--orphan-after", "0.5",
                                                       "--archive", archive_url, "--retention", "30", "--json")
                                     for _ in range(2)))
    outcomes = [json.loads(line)["outcome"] for out in sweeps for line in out.splitlines() if line.startswith("{")]
    assert outcomes.count("archived") == 1, sweeps
    assert set(outcomes) <= {"archived", "busy", "done_before"}, sweeps
    rec = loads(open_archive(archive_url).get("call-orphan") or b"")
    assert len(rec.streams["audio.in"]) == frames
    assert await redis.exists(Keys.ended("call-orphan")) and 0 < await redis.ttl(Keys.audio_in("call-orphan")) <= 30
    assert not await redis.zcard(Keys.ARCHIVE_PENDING)


async def test_racing_sweepers_archive_each_call_once(private: Any, tmp_path: Path) -> None:
    url, redis = private
    dead = await start_bridge(url, archive_url=(tmp_path / "unused").as_uri())
    sids = [f"race-{i}" for i in range(6)]
    for sid in sids:
        await talk(dead, sid, 0.3)
    for sid in sids[:3]:
        await dead.close_session(sid)  # ended, its bridge gone before archiving them
    dead.archiver = None
    await dead.tasks.aclose()
    await dead.redis.aclose()
    await redis.delete(Keys.bridge(dead.id))
    await asyncio.sleep(0.6)

    archive = CountingArchive(tmp_path / "archive")
    clients = [aioredis.Redis.from_url(url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(sweep(c, archive, retention_s=60, who=f"sweeper-{i}", orphan_after_s=0.5)
                                         for i, c in enumerate(clients)))
        done = Counter(r.session for rs in results for r in rs if r.outcome is Outcome.ARCHIVED)
        assert done == Counter(sids) and archive.puts == Counter(sids)
        assert not await sweep(clients[0], archive, retention_s=60, who="late", orphan_after_s=0.5)  # nothing due now
        assert archive.puts == Counter(sids)
    finally:
        for c in clients:
            await c.aclose()


async def test_a_live_call_is_snapshotted_on_demand_then_archived_at_its_end(private: Any, tmp_path: Path) -> None:
    url, redis = private
    archive_url = (tmp_path / "archive").as_uri()
    b = await archiving_bridge(url, archive_url, retention_s=60.0)
    try:
        first = await talk(b, "call-live", 0.5)
        out = await asyncio.to_thread(_voxbus, url, "archive", "call-live", "--archive", archive_url, "--json")
        assert json.loads(out.splitlines()[-1])["outcome"] == "snapshot"
        assert len(loads(open_archive(archive_url).get("call-live") or b"").streams["audio.in"]) == first
        assert await redis.ttl(Keys.audio_in("call-live")) == -1 and not await redis.exists(Keys.archived("call-live"))
        session = b.sessions["call-live"]
        session.push_audio(speech()[:16_000])
        await asyncio.sleep(0.3)
        await b.close_session("call-live")
        await wait_until(lambda: redis.exists(Keys.archived("call-live")), timeout=20, what="archived marker")
        assert len(loads(open_archive(archive_url).get("call-live") or b"").streams["audio.in"]) == first + 50
        assert (await archive_session(redis, open_archive(archive_url), "call-live", retention_s=60, who="x")).outcome \
            is Outcome.DONE_BEFORE
    finally:
        await b.aclose()


async def test_a_failed_upload_is_retried_and_nothing_expires_meanwhile(private: Any, tmp_path: Path) -> None:
    url, redis = private
    b = await start_bridge(url, archive_url=(tmp_path / "a").as_uri(), retention_s=5.0)
    assert b.archiver is not None
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the archive's directory should be")
    b.archiver.archive, b.archiver.settle_s = open_archive(str(blocked)), 0.0
    try:
        await talk(b, "call-retry", 0.3)
        await b.close_session("call-retry")
        await asyncio.sleep(0.5)
        assert not await redis.exists(Keys.archived("call-retry"))
        assert await redis.ttl(Keys.audio_in("call-retry")) > SESSION_TTL_S - 60  # the 24 h safety net
        assert not await redis.exists(Keys.archive_lock("call-retry"))  # released: the next sweep may retry
        results = await sweep(redis, open_archive(str(tmp_path / "b")), retention_s=5, who="s", ended_grace_s=0)
        assert [(r.session, r.outcome) for r in results] == [("call-retry", Outcome.ARCHIVED)]
    finally:
        await b.aclose()


async def test_exporter_reports_redis_memory_and_the_archive_backlog(private: Any, tmp_path: Path) -> None:
    url, redis = private
    await redis.config_set("maxmemory", 256 * 1024 * 1024)
    b = await start_bridge(url, archive_url=(tmp_path / "a").as_uri())
    try:
        for sid in ("m-1", "m-2", "m-3"):
            await talk(b, sid, 0.4)
        assert b.archiver is not None
        b.archiver.archive = open_archive(str(tmp_path / "x"))
        (tmp_path / "x").write_text("blocks the archive")
        await b.close_session("m-1")
        await redis.set(Keys.ended("m-1"), f"{time.time() - 42:.3f}")
        got = await collect_memory(redis, sample=2)
        (used, limit), = got["nodes"].values()
        assert limit == 256 * 1024 * 1024 and 0 < used < limit
        expect = 0
        for key in [*Keys.session_streams("m-2"), *Keys.session_streams("m-3")]:
            expect += await redis.memory_usage(key) or 0
        assert got["sessions_measured"] == 2 and got["session_streams_bytes"] == expect  # the newest 2
        assert got["archive_pending"] == 3 and 41 < got["archive_oldest_ended_s"] < 60
    finally:
        await b.aclose()


def _voxbus(url: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "REDIS_URL": url})
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


async def _gone(redis: aioredis.Redis, sid: str) -> bool:
    return not await redis.exists(*Keys.session_keys(sid))


def test_sweep_timings_leave_room_for_the_heartbeat() -> None:
    """A bridge that beats on time is never taken for dead, and a live call is never taken for over."""
    assert archiving.HEARTBEAT_TTL_S >= 3 * archiving.HEARTBEAT_S
    assert archiving.ORPHAN_AFTER_S > archiving.HEARTBEAT_TTL_S
    assert archiving.LOCK_TTL_S > archiving.SWEEP_INTERVAL_S
