"""voxbus on a real Redis Cluster (three masters, see conftest.py).

What must hold on a cluster: the URL picks the cluster client, with TLS and
ACL credentials; a session's keys share one slot while sessions spread over
the masters; the bus moves frames of sessions on every master with nothing
lost and explicit-id duplicates refused, also while a slot is resharded; a
dead consumer's jobs are reclaimed; a cancel reaches a hub subscribed through
another master than the one holding the session; a real `voxbus worker`
serves and cancels LLM jobs; the exporter reads the queues; and after a master
restarts, frames and cancels flow again with nothing lost since.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from shared import registry
from shared.admin.exporter import collect_once
from shared.bus import BatchPublisher, StreamMux
from shared.cancel import CancelHub, cancelled_turn, publish_cancel
from shared.jobs import JobQueue, enqueue
from shared.protocol import (
    FRAME_BYTES,
    AsrJob,
    AudioFrame,
    AudioOut,
    Cancel,
    Cancelled,
    ChatMessage,
    Keys,
    LlmJob,
    TokenChunk,
    TurnMark,
    WorkerRecord,
    decode_entry,
    encode,
    frame_entry_id,
    output_entry_id,
    turn_range,
)
from shared.redis_conn import (
    connect,
    is_cluster,
    mget,
    redact_url,
    split_cluster_flag,
    wait_ready,
)
from tests.support.polling import wait_until

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_CONSUMER = REPO_ROOT / "tests" / "support" / "job_consumer.py"


def master_of(client: Any, key: str) -> str:
    """The "host:port" of the master that holds `key`."""
    return client.get_node_from_key(key).name


def session_keys(sid: str) -> list[str]:
    return [
        Keys.audio_in(sid), Keys.events(sid), Keys.tokens(sid), Keys.audio_out(sid), Keys.ctx(sid),
        Keys.meta(sid), Keys.cancelled_turn(sid), Keys.cancel_channel(sid),
    ]


def masters(client: Any) -> set[str]:
    return {n.name for n in client.get_primaries()}


def spread(client: Any, names: Any, per_master: int, key: Any = Keys.tokens) -> list[str]:
    """`per_master` names from `names` for each master (by the master of `key(name)`), interleaved."""
    by_master: dict[str, list[str]] = defaultdict(list)
    for name in names:
        group = by_master[master_of(client, key(name))]
        if len(group) < per_master:
            group.append(name)
        if len(by_master) == len(masters(client)) and all(len(g) == per_master for g in by_master.values()):
            return [n for row in zip(*by_master.values()) for n in row]
    raise AssertionError(f"no {per_master} names per master among the candidates")




# --------------------------------------------------------------------------
# Pointing voxbus at a cluster
# --------------------------------------------------------------------------


def test_the_url_decides_between_one_server_and_a_cluster() -> None:
    assert split_cluster_flag("redis://h:1/0") == ("redis://h:1/0", False)
    assert split_cluster_flag("redis://h:1/0?cluster=true") == ("redis://h:1/0", True)
    assert split_cluster_flag("rediss://u:p@h:1?ssl_cert_reqs=none&cluster=yes") == (
        "rediss://u:p@h:1?ssl_cert_reqs=none", True)
    assert split_cluster_flag("redis://h:1/0?cluster=false") == ("redis://h:1/0", False)
    with pytest.raises(ValueError, match="cluster="):
        split_cluster_flag("redis://h:1/0?cluster=maybe")

    single = connect("redis://127.0.0.1:1/0?cluster=false")
    assert not is_cluster(single) and isinstance(single, aioredis.Redis)

    # TLS and ACL credentials reach every node connection of the cluster client (nothing connects yet).
    tls = connect("rediss://voxbus:s3cret@127.0.0.1:1/0?cluster=true&ssl_cert_reqs=none")
    assert isinstance(tls, RedisCluster)
    kwargs = tls.nodes_manager.connection_kwargs
    assert kwargs["connection_class"].__name__ == "SSLConnection"
    assert (kwargs["username"], kwargs["password"], kwargs["ssl_cert_reqs"]) == ("voxbus", "s3cret", "none")
    assert "s3cret" not in redact_url("rediss://voxbus:s3cret@127.0.0.1:1/0?cluster=true")

    with pytest.raises(ValueError, match="database 0"):
        connect("redis://127.0.0.1:1/2?cluster=true")
    with pytest.raises(ValueError, match="redis:// or rediss://"):
        connect("unix:///tmp/redis.sock?cluster=true")


async def test_connect_returns_a_cluster_client_that_serves_every_master(redis_cluster, uid) -> None:
    client = connect(redis_cluster.url)
    try:
        await wait_ready(client, 10, redis_cluster.url)
        assert isinstance(client, RedisCluster) and len(masters(client)) == 3
        keys = spread(client, (f"vb:{{probe{i}-{uid}}}:meta" for i in range(1000)), 10, str)
        for i, key in enumerate(keys):
            await client.set(key, i, ex=60)
        assert await mget(client, keys) == [str(i).encode() for i in range(30)]
        assert await client.delete(*keys) == 30  # redis-py splits a multi-key DEL per slot
    finally:
        await client.aclose()


async def test_an_unreachable_seed_is_a_connection_error_not_a_crash() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0?cluster=true"
    client = connect(url)
    try:
        # redis-py raises a bare RedisClusterException here, which wait_ready would not wait out.
        with pytest.raises(RuntimeError, match="did not answer within 0.5s"):
            await wait_ready(client, 0.5, url)
        with pytest.raises(RedisConnectionError):
            await client.initialize()
    finally:
        await client.aclose()


async def test_acl_credentials_work_and_refused_ones_fail_fast(redis_cluster, node_client, uid) -> None:
    user, password = f"vb{uid}", "pw-" + uid
    for port in redis_cluster.ports:
        await node_client(port).acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                                            channels=["*"], commands=["+@all"])
    host = f"127.0.0.1:{redis_cluster.ports[1]}"
    good = connect(f"redis://{user}:{password}@{host}/0?cluster=true")
    bad = connect(f"redis://{user}:wrong@{host}/0?cluster=true")
    try:
        await wait_ready(good, 10)
        await good.set(f"vb:{{acl-{uid}}}:meta", "ok", ex=60)
        assert await good.get(f"vb:{{acl-{uid}}}:meta") == b"ok"
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="refused the credentials"):
            await wait_ready(bad, 10, f"redis://{user}:wrong@{host}/0?cluster=true")
        assert time.monotonic() - t0 < 3, "a wrong password must not be retried until the timeout"
    finally:
        await good.aclose()
        await bad.aclose()
        for port in redis_cluster.ports:
            await node_client(port).acl_deluser(user)


async def test_a_tls_cluster_carries_frames_jobs_and_cancels(tls_cluster, uid) -> None:
    client = connect(tls_cluster.url)
    hub = CancelHub(client)
    mux = StreamMux(client, block_ms=50, cluster_poll_ms=2)
    pub = BatchPublisher(client)
    try:
        await wait_ready(client, 10, tls_cluster.url)
        assert client.get_default_node().connection_class.__name__ == "SSLConnection"
        # The hub's and the reader's own node connections speak TLS too (the nodes have no plain port).
        await asyncio.wait_for(hub.start(), 10)
        sids = spread(client, (f"tls{i}-{uid}" for i in range(1000)), 2)
        for sid in sids:
            await mux.add(Keys.tokens(sid), "0-0")
        ids = await asyncio.gather(*(
            pub.publish(Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=seq, text="w"), entry_id=output_entry_id(0, seq))
            for sid in sids for seq in range(5)))
        assert all(ids)
        got: dict[str, list[int]] = defaultdict(list)
        async with asyncio.timeout(10):
            while sum(len(v) for v in got.values()) < 5 * len(sids):
                for r in await mux.read():
                    got[r.key].append(r.msg.seq)
        assert dict(got) == {Keys.tokens(sid): list(range(5)) for sid in sids}

        s = next(x for x in sids if master_of(client, Keys.cancelled_turn(x)) != hub.node)
        watch = await hub.watch(s, 0)
        await publish_cancel(client, Cancel(session=s, turn=0))
        await asyncio.wait_for(watch.wait(), 5)

        pool = f"t{uid}-tls"
        queue = JobQueue(client, pool, "c1", stage="asr")
        await queue.ensure_group()
        entry = await enqueue(client, pool, AsrJob(session=s, turn=0, start_seq=0, end_seq=1))
        [delivery] = await queue.read(count=5, block_ms=500)
        assert delivery.entry_id == entry
        await queue.ack(entry)
    finally:
        await pub.aclose()
        await mux.aclose()
        await hub.aclose()
        await client.aclose()


# --------------------------------------------------------------------------
# Key layout
# --------------------------------------------------------------------------


async def test_a_sessions_keys_live_in_one_slot_and_sessions_spread_over_the_masters(
    cluster_redis, node_client, uid
) -> None:
    sids = spread(cluster_redis, (f"lay{i}-{uid}" for i in range(1000)), 10)
    for sid in sids:
        assert len({key_slot(k.encode()) for k in session_keys(sid)}) == 1, sid
    assert len({master_of(cluster_redis, Keys.tokens(s)) for s in sids}) == 3

    # The server agrees: everything written for one session sits in one slot of one master.
    sid = sids[0]
    pipe = cluster_redis.pipeline(transaction=False)
    for key in Keys.session_streams(sid):
        pipe.xadd(key, {b"m": b"x"})
    pipe.rpush(Keys.ctx(sid), b"x")
    pipe.set(Keys.meta(sid), b"x")
    pipe.set(Keys.cancelled_turn(sid), 1)
    await pipe.execute()
    slot = key_slot(Keys.tokens(sid).encode())
    owner = node_client(cluster_redis.get_node_from_key(Keys.tokens(sid)).port)
    assert await owner.execute_command("CLUSTER KEYSLOT", Keys.ctx(sid)) == slot
    held = {k.decode() if isinstance(k, bytes) else k for k in await owner.cluster("GETKEYSINSLOT", slot, 100)}
    assert held == set(Keys.session_streams(sid)) | {Keys.ctx(sid), Keys.meta(sid), Keys.cancelled_turn(sid)}


# --------------------------------------------------------------------------
# The bus
# --------------------------------------------------------------------------


async def test_publisher_and_mux_move_frames_of_sessions_on_every_master(cluster_redis, uid) -> None:
    sids = spread(cluster_redis, (f"bus{i}-{uid}" for i in range(1000)), 12)
    assert len({master_of(cluster_redis, Keys.tokens(s)) for s in sids}) == 3
    tokens_per_session, marks_per_session = 25, 5

    mux = StreamMux(cluster_redis, block_ms=50, cluster_poll_ms=2)
    for sid in sids:
        for key in (Keys.events(sid), Keys.tokens(sid), Keys.audio_out(sid)):
            await mux.add(key, "$")  # empty streams: "$" resolves to 0-0 per key
    expected: dict[str, list[Any]] = defaultdict(list)
    for sid in sids:
        expected[Keys.tokens(sid)] = [(0, seq) for seq in range(tokens_per_session)]
        expected[Keys.events(sid)] = [f"m{i}" for i in range(marks_per_session)]
        expected[Keys.audio_out(sid)] = [0]
    total = sum(len(v) for v in expected.values())
    got: dict[str, list[Any]] = defaultdict(list)

    async def read_all() -> None:
        while sum(len(v) for v in got.values()) < total:
            for r in await mux.read():
                m = r.msg
                got[r.key].append((m.turn, m.seq) if isinstance(m, TokenChunk) else
                                  m.mark if isinstance(m, TurnMark) else m.seq)

    reader = asyncio.create_task(read_all())
    pub = BatchPublisher(cluster_redis, max_batch=200)
    try:
        futs = []
        for seq in range(tokens_per_session):
            for sid in sids:  # interleaved across sessions, as a worker fleet would write
                futs.append(pub.publish_nowait(
                    Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=seq, text=f" w{seq}"),
                    entry_id=output_entry_id(0, seq)))
                if seq < marks_per_session:
                    futs.append(pub.publish_nowait(
                        Keys.events(sid), TurnMark(session=sid, turn=0, stage="llm", mark=f"m{seq}")))
            if seq % 5 == 4:
                await asyncio.sleep(0.005)  # several batches, read while they land
        for sid in sids:
            futs.append(pub.publish_nowait(
                Keys.audio_out(sid), AudioOut(session=sid, turn=0, seq=0, pcm=b"\0\0" * 160, rate=16000)))
        ids = await asyncio.wait_for(asyncio.gather(*futs), 20)
        assert all(ids), "an entry with a fresh id was refused"

        # A retried job writes the same (turn, seq) again: every node refuses it.
        again = await asyncio.wait_for(asyncio.gather(*(
            pub.publish(Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=7, text=" again"),
                        entry_id=output_entry_id(0, 7))
            for sid in sids)), 10)
        assert again == [None] * len(sids)

        await asyncio.wait_for(reader, 20)
        assert pub.stats()["batches"] > 1
        assert await mux.read() == []  # nothing more (the refused duplicates never landed)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await pub.aclose()
        await mux.aclose()

    assert dict(got) == dict(expected)  # per stream: all of it, in order, once
    lengths = await asyncio.gather(*(cluster_redis.xlen(Keys.tokens(s)) for s in sids))
    assert lengths == [tokens_per_session] * len(sids)
    seventh = await cluster_redis.xrange(Keys.tokens(sids[0]), output_entry_id(0, 7), output_entry_id(0, 7))
    assert decode_entry(seventh[0][1]).text == " w7"  # the first write stands


async def test_mux_picks_up_streams_added_and_forgets_removed_ones(redis_cluster, cluster_redis, uid) -> None:
    fresh = connect(redis_cluster.url)  # the reader's first command is its first read: no slot map yet
    mux = StreamMux(fresh, block_ms=3000, cluster_poll_ms=2)
    a, b = f"mxa-{uid}", f"mxb-{uid}"

    async def publish_b_later() -> None:
        await asyncio.sleep(0.05)
        await mux.add(Keys.tokens(b), "0-0")
        await cluster_redis.xadd(Keys.tokens(b), {b"m": encode(TokenChunk(session=b, turn=0, seq=0, text="x"))})

    try:
        await mux.add(Keys.tokens(a), "0-0")
        task = asyncio.create_task(publish_b_later())
        t0 = time.monotonic()
        received = await mux.read()  # polling: the stream added mid-wait is read without waiting out block_ms
        await task
        assert [r.key for r in received] == [Keys.tokens(b)]
        assert time.monotonic() - t0 < 1.5
        mux.remove(Keys.tokens(b))
        await cluster_redis.xadd(Keys.tokens(b), {b"m": encode(TokenChunk(session=b, turn=0, seq=1, text="y"))})
        await cluster_redis.xadd(Keys.tokens(a), {b"m": encode(TokenChunk(session=a, turn=0, seq=0, text="z"))})
        assert [(r.key, r.msg.text) for r in await mux.read()] == [(Keys.tokens(a), "z")]  # not b's "y"
    finally:
        await mux.aclose()
        await fresh.aclose()


async def move_slot(node_client, slot: int, src_port: int, dst_port: int, all_ports: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Reshard one slot from one master to another, keys included, as redis-cli --cluster reshard does."""
    src, dst = node_client(src_port), node_client(dst_port)
    src_id = (await src.execute_command("CLUSTER", "MYID")).decode()
    dst_id = (await dst.execute_command("CLUSTER", "MYID")).decode()
    await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        await src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *keys)
    for port in [dst_port, src_port, *(p for p in all_ports if p not in (src_port, dst_port))]:
        await node_client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


async def test_reader_and_publisher_follow_a_session_whose_slot_moves(
    redis_cluster, cluster_redis, node_client, uid
) -> None:
    sids = spread(cluster_redis, (f"mv{i}-{uid}" for i in range(1000)), 1)
    moving = sids[0]
    src = cluster_redis.get_node_from_key(Keys.tokens(moving))
    dst = next(n for n in cluster_redis.get_primaries() if n.name != src.name)
    mux = StreamMux(cluster_redis, block_ms=50, cluster_poll_ms=2)
    pub = BatchPublisher(cluster_redis)
    got: dict[str, list[int]] = defaultdict(list)

    async def publish_and_read(seqs: range) -> None:
        ids = await asyncio.wait_for(asyncio.gather(*(
            pub.publish_nowait(Keys.tokens(sid), TokenChunk(session=sid, turn=0, seq=seq, text="w"),
                               entry_id=output_entry_id(0, seq))
            for seq in seqs for sid in sids)), 10)
        assert all(ids), "an entry was refused or lost"
        async with asyncio.timeout(10):
            while sum(len(v) for v in got.values()) < len(sids) * seqs.stop:
                for r in await mux.read():
                    got[r.key].append(r.msg.seq)

    try:
        for sid in sids:
            await mux.add(Keys.tokens(sid), "0-0")
        await publish_and_read(range(10))
        await move_slot(node_client, key_slot(Keys.tokens(moving).encode()), int(src.port), int(dst.port),
                        redis_cluster.ports)
        await publish_and_read(range(10, 20))
        assert await mux.read() == []
    finally:
        await pub.aclose()
        await mux.aclose()
    assert {k: v for k, v in got.items()} == {Keys.tokens(sid): list(range(20)) for sid in sids}
    assert cluster_redis.get_node_from_key(Keys.tokens(moving)).name == dst.name  # the client learned the move
    owner = node_client(int(dst.port))
    assert await owner.xlen(Keys.tokens(moving)) == 20


# --------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------


async def getkeys_calls(redis_cluster, node_client) -> int:  # type: ignore[no-untyped-def]
    """COMMAND GETKEYS calls served by all masters so far."""
    total = 0
    for port in redis_cluster.ports:
        stats = await node_client(port).info("commandstats")
        total += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
    return total


async def test_a_killed_consumers_jobs_are_reclaimed_by_another(
    redis_cluster, cluster_redis, node_client, uid
) -> None:
    pool = f"t{uid}-asr"
    survivor = JobQueue(cluster_redis, pool, "survivor", stage="asr", claim_idle_ms=300)
    await survivor.ensure_group()
    enqueued = [await enqueue(cluster_redis, pool, AsrJob(session=f"j{i}-{uid}", turn=i, start_seq=0, end_seq=9))
                for i in range(8)]

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(JOB_CONSUMER), redis_cluster.url, pool, "doomed", "--hold", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        if not line:
            err = await proc.stderr.read()  # type: ignore[union-attr]
            raise AssertionError(f"the consumer never reported its jobs: {err.decode(errors='replace')[-2000:]}")
        held = json.loads(line)["held"]
        assert len(held) == 5 and set(held) <= set(enqueued)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == -signal.SIGKILL

    getkeys_before = await getkeys_calls(redis_cluster, node_client)
    done: dict[str, int] = {}
    for d in await survivor.read(count=10, block_ms=100):  # the three it never took
        done[d.entry_id] = d.deliveries
        await survivor.ack(d.entry_id)
    assert len(done) == 3

    # Fast path (XPENDING + XCLAIM of the consumer the registry says is dead) for two ...
    await asyncio.sleep(0.35)
    for d in await survivor.claim_from("doomed", 2, min_idle_ms=300):
        done[d.entry_id] = d.deliveries
        await survivor.ack(d.entry_id)
    # ... and the XAUTOCLAIM backstop for the rest.
    async with asyncio.timeout(10):
        while len(done) < 8:
            for d in await survivor.reclaim(10):
                done[d.entry_id] = d.deliveries
                await survivor.ack(d.entry_id)
            await asyncio.sleep(0.05)
    assert set(done) == set(enqueued)
    # XREADGROUP was routed by its key, without asking a node (COMMAND GETKEYS) first.
    assert await getkeys_calls(redis_cluster, node_client) == getkeys_before
    assert sorted(done[e] for e in held) == [2] * 5  # each held job delivered once more, not lost, not doubled
    summary = await cluster_redis.xpending(Keys.pool_jobs(pool), Keys.pool_group(pool))
    assert summary["pending"] == 0


# --------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------


async def test_a_cancel_reaches_a_hub_subscribed_through_another_master(cluster_redis, node_client, uid) -> None:
    hub = CancelHub(cluster_redis)
    await hub.start()
    try:
        assert hub.node in masters(cluster_redis)
        sids = spread(cluster_redis, (f"cx{i}-{uid}" for i in range(1000)), 14, Keys.cancelled_turn)
        s = next(x for x in sids if master_of(cluster_redis, Keys.cancelled_turn(x)) != hub.node)
        b = next(x for x in sids if x != s)
        ws, wb = await hub.watch(s, 1), await hub.watch(b, 1)
        assert not ws.cancelled and not wb.cancelled

        await publish_cancel(cluster_redis, Cancel(session=s, turn=1, reason="barge-in"))
        await asyncio.wait_for(ws.wait(), 3)
        assert ws.reason == "barge-in"
        assert not wb.cancelled
        assert await cancelled_turn(cluster_redis, s) == 1
        node = master_of(cluster_redis, Keys.cancelled_turn(s))
        assert await node_client(int(node.rsplit(":", 1)[1])).get(Keys.cancelled_turn(s)) == b"1"

        # Losing the subscription's node connection: the hub moves to another node, reads
        # back (one MGET per slot) what was cancelled meanwhile, and keeps receiving.
        others = [x for x in sids if x not in (s, b)][:12]
        watches = [await hub.watch(x, 2) for x in others]
        assert len({master_of(cluster_redis, Keys.cancelled_turn(x)) for x in others}) == 3
        for x in others:  # recorded as publish_cancel does, but never published: only a resync finds them
            await cluster_redis.set(Keys.cancelled_turn(x), 2, ex=60)
        first_node = hub.node
        victim = node_client(int(first_node.rsplit(":", 1)[1]))
        assert await victim.client_kill_filter(_type="pubsub") == 1
        await asyncio.wait_for(asyncio.gather(*(w.wait() for w in watches)), 5)
        assert all(w.reason == "cancelled during reconnect" for w in watches)

        async def moved() -> bool:
            return hub.node != first_node

        await wait_until(moved, 5, "the hub to subscribe through another node")
        assert not wb.cancelled

        await publish_cancel(cluster_redis, Cancel(session=b, turn=1))
        await asyncio.wait_for(wb.wait(), 3)
    finally:
        await hub.aclose()


# --------------------------------------------------------------------------
# A real worker process, and the exporter
# --------------------------------------------------------------------------


def _voxbus_command() -> list[str]:
    script = Path(sys.executable).with_name("voxbus")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shared.cli"]


async def _tokens(client: Any, sid: str, turn: int) -> list[TokenChunk]:
    lo, hi = turn_range(turn)
    return [decode_entry(f) for _, f in await client.xrange(Keys.tokens(sid), lo, hi)]


async def test_a_real_worker_serves_llm_jobs_and_cancels_on_the_cluster(
    redis_cluster, cluster_redis, tmp_path, uid
) -> None:
    pool = f"t{uid}-llm"
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(
        f'[pools."{pool}"]\nstage = "llm"\nengine = "synthetic"\ngpu_type = "cpu"\nslots = 2\n'
        'options = { step_ms = 20, tokens = 500, reply = "Paris is the capital" }\n', encoding="utf-8")
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *_voxbus_command(), "worker", "--pool", pool, "--pools", str(pools_file), "--drain-timeout", "2",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, "REDIS_URL": redis_cluster.url, "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT,
        )

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        async def registered() -> list[WorkerRecord]:
            if proc.returncode is not None:
                raise AssertionError(f"the worker exited with {proc.returncode}:\n{log_tail()}")
            return [r for r in await registry.worker_records(cluster_redis, pool) if r.pid == proc.pid]

        try:
            await wait_until(registered, 45, "the worker to register")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_tail()}") from None

        # Sessions on every master: the context is read and the tokens written in each session's slot.
        sids = spread(cluster_redis, (f"llm{i}-{uid}" for i in range(1000)), 3, Keys.ctx)
        assert len({master_of(cluster_redis, Keys.ctx(s)) for s in sids}) == 3
        for sid in sids:
            await cluster_redis.rpush(Keys.ctx(sid), encode(ChatMessage(session=sid, role="system", text="Be terse.")),
                                      encode(ChatMessage(session=sid, role="user", text="Capital of France?", turn=0)))
            await enqueue(cluster_redis, pool, LlmJob(session=sid, turn=0, max_tokens=6))
        for sid in sids:
            async def final(sid: str = sid) -> list[TokenChunk]:
                toks = await _tokens(cluster_redis, sid, 0)
                return toks if toks and toks[-1].final else []

            toks = await wait_until(final, 20, f"the final token of {sid}")
            assert [t.seq for t in toks] == list(range(len(toks))) and len(toks) == 7
            assert "".join(t.text for t in toks) == "Paris is the capital Paris is"

        # A barge-in stops a running job of a session on any master.
        long_sid = f"long-{uid}"
        await cluster_redis.rpush(Keys.ctx(long_sid), encode(ChatMessage(session=long_sid, role="user", text="Talk.")))
        await enqueue(cluster_redis, pool, LlmJob(session=long_sid, turn=1, max_tokens=500))  # 10 s of tokens
        await wait_until(lambda: _tokens(cluster_redis, long_sid, 1), 10, "the first token of the long job")
        await publish_cancel(cluster_redis, Cancel(session=long_sid, turn=1))

        async def cancelled() -> list[Any]:
            evs = [decode_entry(f) for _, f in await cluster_redis.xrange(Keys.events(long_sid))]
            return [e for e in evs if isinstance(e, Cancelled) and e.turn == 1]

        await wait_until(cancelled, 5, "the worker to report the cancelled job")
        assert not any(t.final for t in await _tokens(cluster_redis, long_sid, 1))

        # The exporter reads the pool's queue figures and the live worker from the cluster.
        async def settled() -> dict[str, Any] | None:
            row = {r["pool"]: r for r in await collect_once(cluster_redis)}[pool]
            return row if row["pending"] == 0 else None

        row = await wait_until(settled, 5, "the cancelled job to be acked")
        assert (row["workers"], row["slots_total"], row["length"], row["lag"]) == (1, 2, 10, 0)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, log_tail()
    assert await registry.worker_records(cluster_redis, pool) == []  # deregistered on the way out


async def test_exporter_reads_backlogs_and_workers_of_pools_on_different_masters(cluster_redis, uid) -> None:
    pools = spread(cluster_redis, (f"t{uid}-ex{i}" for i in range(1000)), 2, Keys.pool_jobs)
    for n, pool in enumerate(pools, start=1):
        q = JobQueue(cluster_redis, pool, "c1", stage="asr")
        await q.ensure_group()
        for i in range(n + 2):
            await enqueue(cluster_redis, pool, AsrJob(session=f"e{i}-{uid}", turn=i, start_seq=0, end_seq=1))
        await q.read(count=2, block_ms=10)  # two delivered, not acked
        for w in range(n):
            rec = WorkerRecord(worker_id=f"w{w}-{uid}", pool=pool, stage="asr", gpu_type="cpu", host="h",
                               pid=w, slots_total=2, slots_busy=1)
            await registry.heartbeat(cluster_redis, rec, ttl_s=30)
    rows = {r["pool"]: r for r in await collect_once(cluster_redis)}
    for n, pool in enumerate(pools, start=1):
        row = rows[pool]
        assert (row["workers"], row["slots_busy"], row["length"], row["lag"], row["pending"]) == (n, n, n + 2, n, 2), row
        assert row["stage"] == "asr" and row["head_wait_ms"] >= 0


# --------------------------------------------------------------------------
# A master restarts (last: it wipes that master's data)
# --------------------------------------------------------------------------


async def test_frames_and_cancels_flow_again_after_a_master_restarts(redis_cluster, cluster_redis, uid) -> None:
    sids = spread(cluster_redis, (f"rs{i}-{uid}" for i in range(1000)), 2, Keys.audio_in)
    hub = CancelHub(cluster_redis)
    await asyncio.wait_for(hub.start(), 10)
    victim = hub.node  # the hub's own node goes down, and with it a third of the sessions
    assert victim is not None
    victim_sids = [s for s in sids if master_of(cluster_redis, Keys.audio_in(s)) == victim]
    assert len(victim_sids) == 2
    pub = BatchPublisher(cluster_redis)
    mux = StreamMux(cluster_redis, block_ms=50, cluster_poll_ms=2)
    for sid in sids:
        await mux.add(Keys.audio_in(sid), "0-0")
    next_seq = 0
    futures: list[asyncio.Future[Any]] = []
    received: dict[str, set[int]] = defaultdict(set)

    async def produce() -> None:  # the bridge: a frame per session every 20 ms, never waiting on Redis
        nonlocal next_seq
        while True:
            for sid in sids:
                futures.append(pub.publish_nowait(
                    Keys.audio_in(sid), AudioFrame(session=sid, seq=next_seq, pcm=bytes(FRAME_BYTES)),
                    entry_id=frame_entry_id(next_seq)))
            next_seq += 1
            await asyncio.sleep(0.02)

    async def read() -> None:
        while True:
            for r in await mux.read():
                received[r.key].add(r.msg.seq)

    def alive() -> None:
        for task in tasks:
            if task.done() and not task.cancelled():
                raise AssertionError(f"{task.get_name()} ended: {task.exception()!r}")

    async def frames_from(seq: int) -> bool:
        alive()
        return all(any(s >= seq for s in received[Keys.audio_in(sid)]) for sid in sids)

    tasks = [asyncio.create_task(f(), name=f.__name__) for f in (produce, read)]
    port = int(victim.rsplit(":", 1)[1])
    try:
        await wait_until(lambda: frames_from(5), 10, "frames of every session before the restart")
        await asyncio.to_thread(redis_cluster.kill, port)
        # A plain command to the dead master waits (backing off) instead of failing at once.
        patient = asyncio.create_task(cluster_redis.set(Keys.meta(victim_sids[1]), b"after", ex=60))
        await asyncio.sleep(1.0)
        assert not patient.done(), f"gave up while the master was down: {patient}"
        await asyncio.to_thread(redis_cluster.revive, port)
        assert await asyncio.wait_for(patient, 10) is True
        restarted_at = next_seq
        await wait_until(lambda: frames_from(restarted_at + 5), 20, "frames of every session after the restart")

        # The hub lost its node: it listens through another one now, and a cancel for a
        # session of the restarted master still arrives.
        watch = await hub.watch(victim_sids[0], 3)
        await publish_cancel(cluster_redis, Cancel(session=victim_sids[0], turn=3))
        await asyncio.wait_for(watch.wait(), 10)
        assert hub.node != victim

        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await asyncio.wait_for(pub.flush(), 20)
        last = next_seq

        async def everything() -> bool:
            alive()
            return all(set(range(restarted_at, last)) <= received[Keys.audio_in(sid)] for sid in sids)

        await wait_until(everything, 20, "every frame published after the restart")
        escaped = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
        assert escaped == [], f"publishes failed instead of being retried: {escaped[:3]}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)
        if redis_cluster.procs[port].poll() is not None:
            await asyncio.to_thread(redis_cluster.revive, port)
        # Bounded: a component stuck on the restart fails the test instead of hanging it.
        await asyncio.wait_for(asyncio.gather(pub.aclose(), mux.aclose(), hub.aclose()), 15)
