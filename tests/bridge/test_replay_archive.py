"""A call archived when it ended replays identically from the archive alone, after its Redis keys expired.

The call (two spoken questions, Piper speech through the bridge's real ingest
path, real workers and models) is made by a bridge with a directory archive
and a 3 s retention, the way tests/bridge/test_replay.py makes its recording.
The bridge archives the call when it closes it; the keys expire; the
recording is then only in the archive, where `load_recording` finds it by
session id. Replayed against the same (deterministic) workers, every turn's
transcript matches (word error rate 0.00) and so does every reply.
"""

from __future__ import annotations

import json
from pathlib import Path

import redis.asyncio as aioredis

from bridge.replay import compare, recorded_turns, replay_session
from shared.admin.archive import open_archive
from shared.admin.recording import load_recording
from shared.protocol import Keys
from shared.redis_conn import connect
from tests.bridge.test_replay import QUESTIONS, make_recorded_session
from tests.support.bridge import WorkerSet, delete_session_keys
from tests.support.polling import wait_until


async def test_a_call_replays_identically_from_the_archive_after_its_keys_expired(
        workers: WorkerSet, redis_url: str, tmp_path: Path) -> None:
    archive_url = (tmp_path / "archive").as_uri()
    config = workers.config()
    config.bridge.archive_url, config.bridge.retention_s = archive_url, 3.0
    sid = await make_recorded_session(redis_url, config)  # its bridge archives the call as it closes it
    redis = connect(redis_url)
    replayed = ""
    try:
        mark = await wait_until(lambda: redis.get(Keys.archived(sid)), timeout=60, what="the call to be archived")
        assert json.loads(mark)["url"] == archive_url
        await wait_until(lambda: _gone(redis, sid), timeout=30, what="the call's keys to expire")
        assert open_archive(archive_url).exists(sid)

        rec = await load_recording(sid, redis_url, archive_url)  # Redis has nothing left of it
        then = recorded_turns(rec)
        assert [t.transcript.rstrip(".?") for t in then] == [q.rstrip(".?") for q in QUESTIONS]
        replayed, now = await replay_session(redis_url, workers.config(), rec, "max")
        result = compare(then, now)
        assert result["turns_then"] == result["turns_now"] == len(QUESTIONS), result
        for row in result["turns"]:
            assert row["transcript_match"] == 0.0, row
            assert row["agent_now"] == row["agent_then"], row
    finally:
        await redis.zrem(Keys.ARCHIVE_PENDING, sid)
        await redis.aclose()
        await delete_session_keys(redis_url, [sid] + ([replayed] if replayed else []))


async def _gone(redis: aioredis.Redis, sid: str) -> bool:
    return not await redis.exists(*Keys.session_keys(sid))
