"""Hostile input into every stream, list, channel and data channel a live call touches.

Attacked: a call over real WebRTC (bridge + worker processes with the bundled
models, private Redis). 10,000 hostile messages (VOXBUS_CHAOS_HOSTILE) go
into every input of the system: each pool's job stream; the live session's
audio.in, events, tokens and audio.out streams, its context list and its
cancel channel; and the call's `control` data channel (100,000 in all). They are
random bytes, truncated msgpack, unknown type tags and wrong versions, huge
payloads, invalid and unknown session ids, entries naming another (live)
session, wrong message types, wrong field values and wrong entry fields.
Entries of the explicit-id streams (audio.in, tokens, audio.out) are added
right after the stream's newest entry, so they sit inside the id range their
readers really read (audio.in: inside the caller's utterance, which the ASR
job reads back) without taking an id the real outputs need.

What must hold:
- no process crashes: every worker process, the bridge's tasks and the call
  live on;
- each message is rejected and counted where it is read, and dead-lettered
  where the reader owns a dead-letter stream: job entries (also well-formed
  jobs of unknown sessions, which must not run and leave no key behind) in
  the pool's DLQ and the worker's voxbus_bus_rejected_total{kind="jobs"}; events, tokens and
  audio.out entries in `vb:dlq` and the bridge's counter; audio.in entries in
  the ASR worker's counter (every hostile frame inside the job's range);
  context entries in the LLM worker's counter (every one, at the next turn);
  cancel messages in every worker's counter; control messages in the call's
  rejection counter and voxbus_control_rejected_total;
- the live call still completes turns: the turn the audio.in flood landed in,
  and a new turn after everything else.

A second test forges an interrupt for another live session through a
caller's control channel: that session's agent keeps speaking, no Cancel for
it is published, and its context is not rewritten. A third makes callers hang
up and call again as fast as they can beside 180 held sessions: the bridge's
single stream reader must survive and keep reading.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from bridge.core import Bridge
from bridge.session import TurnState
from bridge.transports.webrtc import WebRtcTransport
from shared.protocol import (
    FRAME_BYTES,
    MAX_ENTRY_BYTES,
    AsrJob,
    AudioFrame,
    AudioOut,
    Cancel,
    ChatMessage,
    EotJob,
    Interrupt,
    Keys,
    LlmJob,
    Message,
    TokenChunk,
    Transcript,
    TtsJob,
    decode_as,
    decode_dead_letter,
    encode,
)
from shared.redis_conn import connect
from shared.wer import wer
from tests.support import chaos
from tests.support.prom import local_counter

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

HOSTILE_PER_TARGET = int(os.environ.get("VOXBUS_CHAOS_HOSTILE", "10000"))
FIRST = "Tell me about the sun."
SECOND = "What is a volcano?"
MAX_CONTROL_BYTES = 4096  # BridgeConfig.max_datachannel_bytes (default)
TARGETS = ("jobs:asr", "jobs:llm", "jobs:tts", "jobs:eot", "audio.in", "events", "tokens", "audio.out", "ctx", "cancel", "control")
CATEGORIES = ("random", "truncated", "unknown_tag", "wrong_version", "unknown_session", "invalid_session",
              "other_session", "wrong_type", "bad_values", "wrong_fields")
HUGE_EVERY = 100  # one message in this many is a huge payload (each above MAX_ENTRY_BYTES)
CHURN_SESSIONS = 180  # 3 followed streams each: more than StreamMux's 512-stream shard
CHURN_S = 5.0

# Adds entries right after the newest one of an explicit-id stream: ids <newest ms>-<seq+1>, <seq+2>, ...
# ARGV: per entry, its field count and then its field/value pairs. Returns the last id added.
_ADD_AT_TOP = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local ms, seq = '1', 0
if #top > 0 then
  local id = top[1][1]
  local dash = string.find(id, '-', 1, true)
  ms, seq = string.sub(id, 1, dash - 1), tonumber(string.sub(id, dash + 1))
end
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  seq = seq + 1
  local args = {'XADD', KEYS[1], ms .. '-' .. seq}
  for j = 1, 2 * n do args[#args + 1] = ARGV[i + j] end
  i = i + 2 * n + 1
  redis.call(unpack(args))
end
return ms .. '-' .. seq
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(chaos_cluster: chaos.ChaosCluster) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    await asyncio.to_thread(chaos_cluster.ensure_all, 1)
    async with chaos.chaos_bridge(chaos_cluster, max_datachannel_bytes=MAX_CONTROL_BYTES) as pair:
        yield pair


# ----------------------------------------------------------------------------- hostile messages

@dataclass
class Hostile:
    category: str
    payload: bytes | str  # the `m` field, the list element, the pub/sub message or the data-channel message
    fields: dict[bytes, bytes] | None = None  # a stream entry with other fields than exactly `m`


def _genuine(target: str, session: str, i: int, turn: int) -> Message:
    """A well-formed message of the kind `target` carries, naming `session`."""
    if target == "audio.in":
        return AudioFrame(session=session, seq=i, pcm=bytes(FRAME_BYTES))
    if target == "events":
        return Transcript(session=session, turn=turn, text=f"hostile {i}")
    if target == "tokens":
        return TokenChunk(session=session, turn=turn, seq=i, text=" hostile")
    if target == "audio.out":
        return AudioOut(session=session, turn=turn, seq=i, pcm=bytes(960), rate=24_000)
    if target == "ctx":
        return ChatMessage(session=session, role="user", text=f"hostile {i}")
    if target == "cancel":
        return Cancel(session=session, turn=10**6, reason="hostile")
    stage = target.split(":", 1)[1]
    if stage == "asr":
        return AsrJob(session=session, turn=0, start_seq=0, end_seq=50)
    if stage == "llm":
        return LlmJob(session=session, turn=0)
    if stage == "eot":
        return EotJob(session=session, turn=0, start_seq=0, end_seq=50)
    return TtsJob(session=session, turn=0, text=None if i % 2 else f"hostile {i}")


def _misplaced(target: str, session: str, i: int) -> Message:
    """A well-formed message of a kind `target` does not carry, naming the attacked session itself."""
    if target == "audio.in":
        return TokenChunk(session=session, turn=0, seq=i, text="hostile")
    if target in ("events", "ctx"):
        return AudioFrame(session=session, seq=i, pcm=bytes(FRAME_BYTES))
    if target == "tokens":
        return Transcript(session=session, turn=0, text="hostile")
    if target == "audio.out":
        return TokenChunk(session=session, turn=0, seq=i, text="hostile")
    if target == "cancel":
        return Interrupt(session=session, turn=0)
    other_stage = {"jobs:asr": LlmJob(session=session, turn=0), "jobs:llm": TtsJob(session=session, turn=0),
                   "jobs:tts": AsrJob(session=session, turn=0, start_seq=0, end_seq=1),
                   "jobs:eot": LlmJob(session=session, turn=1)}[target]
    return other_stage if i % 2 else TokenChunk(session=session, turn=0, seq=i, text="hostile")


def _as_dict(msg: Message) -> dict[str, object]:
    return msgspec.msgpack.decode(encode(msg))


def hostile_messages(target: str, session: str, other: str, n: int, rng: random.Random, turn: int = 0) -> list[Hostile]:
    """`n` hostile messages for `target`, every category in turn, one in HUGE_EVERY huge."""
    out: list[Hostile] = []
    ghost = f"ghost-{rng.randrange(16**8):08x}"
    for i in range(n):
        genuine = _genuine(target, session, i, turn)
        tag = type(genuine).__struct_config__.tag  # type: ignore[attr-defined]
        if i % HUGE_EVERY == HUGE_EVERY - 1:
            fields = {**_as_dict(genuine), "pad": bytes(MAX_ENTRY_BYTES)}
            out.append(Hostile("huge", msgspec.msgpack.encode(fields)))
            continue
        category = CATEGORIES[i % len(CATEGORIES)]
        if category == "random":
            payload = rng.randbytes(rng.randrange(1, 300))
        elif category == "truncated":
            full = encode(genuine)
            payload = full[: rng.randrange(1, len(full))]
        elif category == "unknown_tag":
            payload = msgspec.msgpack.encode({**_as_dict(genuine), "type": f"evil.{i % 7}/1"})
        elif category == "wrong_version":
            payload = msgspec.msgpack.encode({**_as_dict(genuine), "type": tag.split("/")[0] + "/2"})
        elif category == "unknown_session":
            payload = encode(_genuine(target, ghost, i, turn))
        elif category == "invalid_session":
            payload = msgspec.msgpack.encode({**_as_dict(genuine), "session": rng.choice(["a:{b}", "", "x" * 65, "é"])})
        elif category == "other_session":
            if target.startswith("jobs:"):  # any job names some session: a job for an unknown one is the attack
                payload = encode(_genuine(target, f"ghost-{i}", i, turn))
            else:
                payload = encode(_genuine(target, other, i, turn))
        elif category == "wrong_type":
            payload = encode(_misplaced(target, session, i))
        elif category == "bad_values":
            bad = {**_as_dict(genuine), "turn": "zero", "seq": -1.5, "text": 7, "role": "root", "pcm": "not bytes",
                   "rate": 7, "start_seq": None}
            payload = msgspec.msgpack.encode(bad)
        else:  # wrong_fields: only streams have fields; elsewhere it is one more random payload
            if target in ("ctx", "cancel", "control"):
                payload = rng.randbytes(rng.randrange(1, 64))
            elif i % 2:
                out.append(Hostile(category, b"", {b"x": encode(genuine)}))
                continue
            else:
                out.append(Hostile(category, b"", {b"m": encode(genuine), b"n": b"1"}))
                continue
        out.append(Hostile(category, payload))
    return out


def control_messages(session: str, other: str, n: int, rng: random.Random) -> list[str | bytes]:
    """`n` hostile messages for a call's control channel: nothing in them is a request the bridge may honour."""
    shapes: list[Callable[[int], str | bytes]] = [
        lambda i: rng.randbytes(rng.randrange(1, 200)),
        lambda i: "{not json " + str(i),
        lambda i: rng.choice(["[1, 2, 3]", "null", "42", '"interrupt"', "true"]),
        lambda i: json.dumps({"type": rng.choice([5, None, ["interrupt"], {"t": 1}])}),
        lambda i: json.dumps({"kind": "interrupt", "i": i}),
        lambda i: json.dumps({"type": rng.choice(["shutdown", "cancel", "INTERRUPT", "eval", ""])}),
        lambda i: json.dumps({"type": "interrupt", "session": other}),
        lambda i: json.dumps({"type": "interrupt", "session_id": rng.choice([other, f"ghost-{i}", 5, ""])}),
        lambda i: json.dumps({"type": "interrupt", "pad": "x" * rng.randrange(MAX_CONTROL_BYTES, 60_000)}),
        lambda i: json.dumps({"type": "ping", "id": rng.choice([{"nested": [i]}, "x" * 65, [1, 2]])}),
    ]
    return [shapes[i % len(shapes)](i) for i in range(n)]


# ----------------------------------------------------------------------------- injection

async def add_at_top(redis: aioredis.Redis, key: str, items: list[Hostile]) -> str:
    """Append `items` right after the stream's newest entry, in one atomic script."""
    argv: list[bytes | str | int] = []
    for h in items:
        fields = h.fields if h.fields is not None else {b"m": h.payload}
        argv.append(len(fields))
        for k, v in fields.items():
            argv += [k, v]
    last = await redis.eval(_ADD_AT_TOP, 1, key, *argv)
    return last.decode() if isinstance(last, bytes) else last


async def add_entries(redis: aioredis.Redis, key: str, items: list[Hostile]) -> None:
    for start in range(0, len(items), 200):
        pipe = redis.pipeline(transaction=False)
        for h in items[start:start + 200]:
            pipe.xadd(key, h.fields if h.fields is not None else {b"m": h.payload})
        await pipe.execute()


async def publish_all(redis: aioredis.Redis, channel: str, items: list[Hostile]) -> None:
    for start in range(0, len(items), 100):
        pipe = redis.pipeline(transaction=False)
        for h in items[start:start + 100]:
            pipe.publish(channel, h.payload)
        await pipe.execute()
        await asyncio.sleep(0.01)  # keep the subscribers' output buffers far from Redis's pub/sub limits


def bridge_rejected(kind: str) -> float:
    return local_counter("voxbus_bus_rejected_total", kind=kind)


async def worker_rejected(workers: list[chaos.WorkerProc], kind: str) -> float:
    return await asyncio.to_thread(chaos.pool_counter, workers, "voxbus_bus_rejected_total", kind=kind)


# ----------------------------------------------------------------------------- tests

async def test_hostile_flood_is_rejected_counted_and_the_call_goes_on(
        stack: tuple[Bridge, WebRtcTransport], chaos_cluster: chaos.ChaosCluster) -> None:
    bridge, transport = stack
    cluster = chaos_cluster
    rng = random.Random(8)
    counts = {target: HOSTILE_PER_TARGET for target in TARGETS}
    redis = connect(cluster.redis_url)
    victim = await chaos.connected_caller(transport)
    bystander = await chaos.connected_caller(transport)  # a live session the hostile entries name
    sid, other = victim.session_id, bystander.session_id
    workers = {stage: cluster.live(stage) for stage in cluster.pools}
    every_worker = [w for ws in workers.values() for w in ws]
    try:
        # ---- turn 0: the audio.in flood lands inside the caller's utterance, which ASR reads back
        audio_in = hostile_messages("audio.in", sid, other, counts["audio.in"], rng)
        asr_rejected = await worker_rejected(workers["asr"], "audio.in")
        session = bridge.sessions[sid]

        async def flood_audio_in() -> None:
            await chaos.eventually(lambda: session.state == TurnState.USER_SPEAKING, 30, "the caller to be speaking")
            await add_at_top(redis, Keys.audio_in(sid), audio_in)

        first = await chaos.run_turn(victim, FIRST, during=flood_audio_in)
        print(f"\nturn {first.turn}: heard {first.heard!r}, replied {first.agent_text!r}")
        assert wer(FIRST, first.heard) <= 0.25, first.heard
        got = await worker_rejected(workers["asr"], "audio.in") - asr_rejected
        assert got >= len(audio_in), f"the ASR worker rejected {got} of the {len(audio_in)} hostile frames it read"
        assert first.audio_frames >= 25 and first.token_text == first.agent_text

        # ---- everything else, while the call is live
        per_target = {t: hostile_messages(t, sid, other, counts[t], rng, turn=first.turn)
                      for t in TARGETS if t not in ("audio.in", "control")}
        control = control_messages(sid, other, counts["control"], rng)
        call = transport.calls[sid]
        before = {
            "dlq": await redis.xlen(Keys.DLQ),
            **{f"dlq {s}": await redis.xlen(Keys.pool_dlq(p)) for s, p in cluster.pools.items()},
            **{f"bridge {k}": bridge_rejected(k) for k in ("events", "tokens", "audio.out")},
            **{f"jobs {s}": await worker_rejected(workers[s], "jobs") for s in cluster.pools},
            **{f"cancel {w.worker_id}": await worker_rejected([w], "cancel") for w in every_worker},
            "control": sum(call.control.rejected.values()),
            "control metric": local_counter("voxbus_control_rejected_total"),
        }
        started = time.monotonic()
        for stage, pool in cluster.pools.items():
            await add_entries(redis, Keys.pool_jobs(pool), per_target[f"jobs:{stage}"])
        await add_entries(redis, Keys.events(sid), per_target["events"])
        await add_at_top(redis, Keys.tokens(sid), per_target["tokens"])
        await add_at_top(redis, Keys.audio_out(sid), per_target["audio.out"])
        for start in range(0, len(per_target["ctx"]), 200):
            await redis.rpush(Keys.ctx(sid), *(h.payload for h in per_target["ctx"][start:start + 200]))
        await publish_all(redis, Keys.cancel_channel(sid), per_target["cancel"])
        for msg in control:
            victim.send(msg)
        await victim.ping(1, timeout=60)  # the control channel is ordered: everything before it was handled

        # ---- each one rejected and counted (dead-lettered where the reader has a dead-letter stream)
        async def figures() -> dict[str, float]:
            return {
                "dlq": await redis.xlen(Keys.DLQ) - before["dlq"],
                **{f"dlq {s}": await redis.xlen(Keys.pool_dlq(p)) - before[f"dlq {s}"] for s, p in cluster.pools.items()},
                **{f"bridge {k}": bridge_rejected(k) - before[f"bridge {k}"] for k in ("events", "tokens", "audio.out")},
                **{f"jobs {s}": await worker_rejected(workers[s], "jobs") - before[f"jobs {s}"] for s in cluster.pools},
                **{f"cancel {w.worker_id}": await worker_rejected([w], "cancel") - before[f"cancel {w.worker_id}"]
                   for w in every_worker},
                "control": sum(call.control.rejected.values()) - before["control"],
                "control metric": local_counter("voxbus_control_rejected_total") - before["control metric"],
            }

        want: dict[str, float] = {
            "dlq": counts["events"] + counts["tokens"] + counts["audio.out"],
            **{f"dlq {s}": counts[f"jobs:{s}"] for s in cluster.pools},
            **{f"bridge {k}": counts[k] for k in ("events", "tokens", "audio.out")},
            **{f"jobs {s}": counts[f"jobs:{s}"] for s in cluster.pools},
            **{f"cancel {w.worker_id}": counts["cancel"] for w in every_worker},
            "control": counts["control"],
            "control metric": counts["control"],
        }
        last: dict[str, float] = {}

        async def all_counted() -> bool:
            last.update(await figures())
            return all(last[k] >= v for k, v in want.items())

        try:
            await chaos.eventually(all_counted, 90, "every hostile message to be rejected and counted", interval=0.5)
        finally:
            print("hostile messages per target:", counts)
            print("rejected / dead-lettered:", {k: (last.get(k), want[k]) for k in want})
        print(f"all counted {time.monotonic() - started:.1f} s after the flood began")
        assert last == want, {k: (last[k], want[k]) for k in want if last[k] != want[k]}
        assert call.control.accepted["interrupt"] == 0
        for pool in cluster.pools.values():
            letters = [decode_dead_letter(f[b"m"]) for _, f in await redis.xrevrange(Keys.pool_dlq(pool), count=50)]
            assert all(letter.source == Keys.pool_jobs(pool) for letter in letters)
        ghosts = [k async for k in redis.scan_iter(match="vb:{ghost-*", count=1000)]
        assert not ghosts, f"jobs of unknown sessions were run: they wrote {len(ghosts)} keys, e.g. {ghosts[:3]}"

        # ---- nobody crashed, the call goes on: a new turn end to end (its LLM job reads the flooded context)
        assert all(w.alive for w in every_worker), [w.log_tail() for w in every_worker if not w.alive]
        assert not bridge.tasks.failed.is_set() and not any(t.done() for t in bridge.tasks)
        assert victim.pc.connectionState == "connected" and sid in bridge.sessions
        ctx_before = await worker_rejected(workers["llm"], "ctx")
        second = await chaos.run_turn(victim, SECOND)
        print(f"turn {second.turn}: heard {second.heard!r}, replied {second.agent_text!r}")
        assert second.turn > first.turn and second.audio_frames >= 25
        assert second.token_text == second.agent_text and len(second.agent_text.split()) >= 3
        # every LLM job of the turn read the whole context (one job, unless a preemptive one was abandoned)
        ctx_rejected = await worker_rejected(workers["llm"], "ctx") - ctx_before
        assert ctx_rejected >= counts["ctx"] and ctx_rejected % counts["ctx"] == 0, (
            f"the LLM worker rejected {ctx_rejected:.0f} hostile context entries; it read {counts['ctx']} per job")
        await chaos.assert_no_duplicate_outputs(redis, sid, second.turn)
        chaos.assert_caller_tokens_unique(victim)
        assert all(w.alive for w in every_worker)
        assert not bystander.controls("interrupted") and not await redis.exists(Keys.cancelled_turn(other))
    finally:
        await asyncio.gather(victim.aclose(), bystander.aclose())
        await purge_pools(redis, cluster)
        await redis.aclose()


async def purge_pools(redis: aioredis.Redis, cluster: chaos.ChaosCluster) -> None:
    """Leave the pools as the flood found them: hostile jobs a worker still holds or retries must not
    slow down the tests after this one (whatever it concluded about them)."""
    for pool in cluster.pools.values():
        key, group = Keys.pool_jobs(pool), Keys.pool_group(pool)
        await redis.xtrim(key, maxlen=0, approximate=False)
        await redis.delete(Keys.pool_errors(pool))
        cursor = "0-0"
        while True:  # XAUTOCLAIM drops pending entries whose job no longer exists
            cursor = (await redis.xautoclaim(key, group, "purge", 0, cursor, count=1000))[0]
            if cursor in (b"0-0", "0-0"):
                break


async def test_interrupt_forged_for_another_session_has_no_effect(
        stack: tuple[Bridge, WebRtcTransport], chaos_cluster: chaos.ChaosCluster) -> None:
    bridge, transport = stack
    redis = connect(chaos_cluster.redis_url)
    attacker = await chaos.connected_caller(transport)
    speaker = await chaos.connected_caller(transport)
    sid = speaker.session_id
    pubsub = redis.pubsub()
    await pubsub.subscribe(Keys.cancel_channel(sid))
    try:
        asked_at = time.time()
        speaker.mic.play(chaos.question_audio(FIRST))
        transcript = await chaos.wait_transcript(speaker, 0)
        turn = int(transcript["turn"])
        await speaker.wait_for(lambda: len(speaker.audio_frames(since=asked_at)) >= 25, 120, "the agent to be speaking")
        ctx_before = await redis.lrange(Keys.ctx(sid), 0, -1)

        forged: list[dict[str, object]] = [
            {"type": "interrupt", "session": sid},
            {"type": "interrupt", "session_id": sid},
            {"type": "interrupt", "session": sid, "session_id": attacker.session_id},
            {"type": "interrupt", "session": sid, "turn": turn, "source": "vad"},
        ]
        for msg in forged:
            attacker.send(msg)
        await attacker.ping(1)
        forged_at = time.time()
        call = transport.calls[attacker.session_id]
        assert call.control.rejected["foreign_session"] == len(forged)
        assert call.control.accepted["interrupt"] == 0

        # the speaker's agent keeps speaking and finishes its answer
        await speaker.wait_for(lambda: len(speaker.audio_frames(since=forged_at)) >= 25, 30,
                               "the speaker's agent audio to go on after the forged interrupts")
        result = await chaos.wait_turn_done(speaker, turn, asked_at)
        assert not speaker.controls("interrupted"), speaker.controls("interrupted")
        assert result.token_text == result.agent_text
        session = bridge.sessions[sid]
        assert session.playout.min_turn == 0 and not session.times[turn].interrupted

        # no Cancel for it was published or recorded
        cancels = []
        while (msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
            cancels.append(msg)
        assert not cancels, f"a Cancel was published for {sid}: {cancels}"
        assert not await redis.exists(Keys.cancelled_turn(sid))

        # its context was not rewritten: what was there stays, and the answer is appended whole
        ctx_after = await redis.lrange(Keys.ctx(sid), 0, -1)
        assert ctx_after[: len(ctx_before)] == ctx_before
        added = [decode_as(raw, ChatMessage) for raw in ctx_after[len(ctx_before):]]
        assert [(m.role, m.interrupted, m.text) for m in added] == [("assistant", False, result.agent_text)], added
        chaos.assert_caller_tokens_unique(speaker)
        await chaos.assert_no_duplicate_outputs(redis, sid, turn)
    finally:
        await pubsub.aclose()
        await asyncio.gather(attacker.aclose(), speaker.aclose())
        await redis.aclose()


async def test_callers_churning_beside_hundreds_of_streams_never_stop_the_bridge_reader(
        chaos_cluster: chaos.ChaosCluster) -> None:
    """Calls hanging up and calling again, fast, while the bridge follows more streams than one XREAD
    shard holds (StreamMux reads them in shards, then blocks on all): the one reader task of the
    bridge must survive every close that lands while a round is in flight, and keep reading."""
    async with chaos.chaos_bridge(chaos_cluster, max_sessions=CHURN_SESSIONS + 8) as (bridge, _):
        redis = connect(chaos_cluster.redis_url)
        held = [await bridge.open_session() for _ in range(CHURN_SESSIONS)]
        assert len(bridge.mux) > 512, "not enough streams for sharded reads"
        reader = next(t for t in bridge.tasks if t.get_name() == "bridge-reader")
        try:
            churned = 0
            deadline = time.monotonic() + CHURN_S
            while time.monotonic() < deadline and not reader.done():
                await bridge.close_session(held.pop(0).id)
                held.append(await bridge.open_session())
                churned += 1
                await asyncio.sleep(0.002)
            assert not reader.done(), f"the bridge's reader died after {churned} hang-ups: {reader.exception()!r}"
            # and it still reads: a junk event in a live session's stream is rejected and counted
            before = local_counter("voxbus_bus_rejected_total", kind="events")
            await redis.xadd(Keys.events(held[-1].id), {b"m": b"\xc1 junk"})
            await chaos.eventually(lambda: local_counter("voxbus_bus_rejected_total", kind="events") > before, 10,
                             "the bridge's reader to read the live sessions' streams")
            print(f"\n{churned} hang-ups beside {len(bridge.mux)} followed streams")
        finally:
            for session in held:
                await bridge.close_session(session.id)
            await redis.aclose()
