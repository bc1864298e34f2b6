"""Redis dies and comes back empty in the middle of a real call.

Attacked: a call over real WebRTC with the bridge and the worker processes
(bundled models) all on a private redis-server. While the agent's first answer
is still playing to the caller, the server is SIGKILLed and, after a short
outage, started again on the same port with nothing in it (no persistence:
every stream, consumer group, registry entry and context list is gone).

What must hold:
- every process reconnects within 5 s of the new server answering: each
  worker's registry entry reappears (heartbeats), each pool's consumer group
  exists again, each worker's cancel subscription is back, the bridge's
  batched publishes land again (the live call's audio.in stream refills) and
  its stream reader reads again (a junk event is rejected and counted);
- nothing crashed: every worker process and the bridge's tasks still run;
- the answer that was playing plays to its end, and a NEW turn works end to
  end afterwards: the caller speaks again, is transcribed, and hears a
  complete answer with no duplicated (turn, seq);
- the conversation survives: the bridge writes the context list (system
  prompt, the first question and answer) and the session's metadata again,
  so the new turn is answered with everything said before.
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
from shared.protocol import ChatMessage, Keys, decode_as
from shared.redis_conn import connect
from shared.wer import wer
from tests.support import chaos
from tests.support.prom import local_counter

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

FIRST = "Tell me about the sun."
SECOND = "What is a volcano?"
RECONNECT_BOUND_S = 5.0  # issue #8: all processes reconnect within 5 s
OUTAGE_S = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(chaos_cluster: chaos.ChaosCluster) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    await asyncio.to_thread(chaos_cluster.ensure_all, 1)
    async with chaos.chaos_bridge(chaos_cluster) as pair:
        yield pair


def expected_components(cluster: chaos.ChaosCluster, workers: list[chaos.WorkerProc]) -> list[str]:
    return ([f"registry {w.worker_id}" for w in workers] + [f"group {cluster.pools[s]}" for s in cluster.pools]
            + ["cancel subscriptions", "bridge publishes", "bridge reads"])


async def measure_reconnects(redis: aioredis.Redis, cluster: chaos.ChaosCluster, sid: str, up_at: float,
                             give_up_s: float = 30.0) -> dict[str, float]:
    """Seconds from `up_at` (monotonic) until each process is seen working against the new server."""
    workers = cluster.all_live()
    seen: dict[str, float] = {}
    rejected_before = local_counter("voxbus_bus_rejected_total", kind="events")
    next_probe = 0.0
    deadline = up_at + give_up_s
    while time.monotonic() < deadline:
        now = time.monotonic() - up_at
        for w in workers:
            if f"registry {w.worker_id}" not in seen and await redis.zscore(Keys.pool_workers(w.pool), w.worker_id):
                seen[f"registry {w.worker_id}"] = now
        for stage in cluster.pools:
            pool = cluster.pools[stage]
            if f"group {pool}" not in seen and await redis.exists(Keys.pool_jobs(pool)):
                groups = await redis.xinfo_groups(Keys.pool_jobs(pool))
                if any(g["name"].decode() == Keys.pool_group(pool) for g in groups):
                    seen[f"group {pool}"] = now
        subscribed = sum(1 for c in await redis.client_list() if int(c.get("psub", 0)) > 0)
        if "cancel subscriptions" not in seen and subscribed >= len(workers):
            seen["cancel subscriptions"] = now
        if "bridge publishes" not in seen and await redis.xlen(Keys.audio_in(sid)) > 0:
            seen["bridge publishes"] = now
        if "bridge reads" not in seen:  # a junk event the bridge's reader must reject (and count)
            if local_counter("voxbus_bus_rejected_total", kind="events") > rejected_before:
                seen["bridge reads"] = now
            elif time.monotonic() >= next_probe:
                await redis.xadd(Keys.events(sid), {b"m": b"\xc1 reconnect probe"})
                next_probe = time.monotonic() + 0.1
        if set(expected_components(cluster, workers)) <= set(seen):
            break
        await asyncio.sleep(0.02)
    return seen


async def test_redis_restart_mid_call_everything_reconnects_and_a_new_turn_works(
        stack: tuple[Bridge, WebRtcTransport], chaos_cluster: chaos.ChaosCluster) -> None:
    bridge, transport = stack
    cluster = chaos_cluster
    client = await chaos.connected_caller(transport)
    sid = client.session_id
    redis = connect(cluster.redis_url)
    try:
        # the first answer is playing: its audio is all in the bridge, part of it already heard
        asked_at = time.time()
        client.mic.play(chaos.question_audio(FIRST))
        first = await chaos.wait_transcript(client, 0)
        turn = int(first["turn"])
        session = bridge.sessions[sid]
        await client.wait_for(lambda: turn in session.playout.turns and session.playout.turns[turn].final
                              and len(client.audio_frames(since=asked_at)) >= 25, 120,
                              "the first answer to be playing")
        workers = cluster.all_live()
        restored_before = local_counter("voxbus_context_restored_total")

        await asyncio.to_thread(cluster.crash_redis)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(cluster.start_redis)
        up_at = time.monotonic()
        await redis.aclose()
        redis = connect(cluster.redis_url)
        seen = await measure_reconnects(redis, cluster, sid, up_at)

        expected = expected_components(cluster, workers)
        report = ", ".join(f"{k}: {v:.2f} s" for k, v in sorted(seen.items(), key=lambda kv: kv[1]))
        print(f"\nreconnected after the restart: {report}")
        missing = [k for k in expected if k not in seen]
        assert not missing, f"never reconnected (30 s): {missing}; seen: {report}"
        slowest = max(seen[k] for k in expected)
        assert slowest <= RECONNECT_BOUND_S, (
            f"reconnecting took {slowest:.2f} s, more than the {RECONNECT_BOUND_S:.0f} s bound: {report}")

        # nobody crashed, and the answer that was playing still plays to its end
        assert all(w.alive for w in workers), [w.log_tail() for w in workers if not w.alive]
        assert not bridge.tasks.failed.is_set(), bridge.tasks.failure  # no vital loop of the bridge ended
        await chaos.wait_turn_done(client, turn, asked_at)

        # a new turn end to end, on the empty server
        known = len(chaos.final_transcripts(client))
        second = await chaos.run_turn(client, SECOND)
        assert second.turn > turn
        assert len(chaos.final_transcripts(client)) == known + 1
        print(f"after the restart: heard {second.heard!r}, replied {second.agent_text!r} "
              f"({second.audio_frames} agent frames)")
        assert wer(SECOND, second.heard) <= 0.5, second.heard
        assert second.audio_frames >= 25
        assert second.token_text == second.agent_text
        await chaos.assert_no_duplicate_outputs(redis, sid, second.turn)
        chaos.assert_caller_tokens_unique(client)
        assert all(w.alive for w in workers)

        # the context the LLM worker read for the new turn held the whole conversation
        ctx = [decode_as(raw, ChatMessage) for raw in await redis.lrange(Keys.ctx(sid), 0, -1)]
        assert [m.role for m in ctx[:4]] == ["system", "user", "assistant", "user"], [(m.role, m.text) for m in ctx]
        assert wer(FIRST, ctx[1].text) <= 0.5 and ctx[3].turn == second.turn, [(m.role, m.text) for m in ctx]
        assert await redis.exists(Keys.meta(sid))
        assert local_counter("voxbus_context_restored_total") == restored_before + 1
    finally:
        await client.aclose()
        await redis.aclose()
