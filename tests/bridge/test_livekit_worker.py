"""The LiveKit worker (bridge.transports.livekit_agent): load, drain, refusals, registration.

No LiveKit server can run here. The real AgentServer runs its real THREAD
executor and real JobContext; two doubles stand in for the server:
- `LiveKitAgentServerDouble` (tests/support/livekit_server.py) speaks the real
  agent protocol on `/agent`: registration, availability requests;
- fake jobs (`AgentServer.simulate_job`) get a `RoomDouble` (tests/support/livekit.py)
  instead of the SDK's mock room.
The calls run on a real Bridge (shared Redis, real Silero VAD).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from livekit.agents import JobRequest
from livekit.protocol import agent, models

from bridge.core import Bridge
from bridge.transports.livekit_agent import LiveKitSettings, LiveKitTransport
from tests.support.livekit import Reason, RoomDouble, caller_mic, packets_on, rooms_for_fake_jobs
from tests.support.livekit_rig import MAX_SESSIONS, until
from tests.support.livekit_server import livekit_agent_server

pytest_plugins = ("tests.support.livekit_fixtures",)  # the fixtures: bridge

SECRET = "s" * 40


@contextlib.asynccontextmanager
async def worker(bridge: Bridge, monkeypatch: pytest.MonkeyPatch, make_room: Callable[[], RoomDouble], *,
                 url: str = "ws://127.0.0.1:9", register: bool = False,
                 drain_timeout_s: float = 0) -> AsyncIterator[tuple[LiveKitTransport, list[RoomDouble]]]:
    rooms = rooms_for_fake_jobs(monkeypatch, make_room)
    transport = LiveKitTransport(bridge, settings=LiveKitSettings(url, "key", SECRET), port=0, register=register,
                                 drain_timeout_s=drain_timeout_s)
    await transport.start()
    try:
        yield transport, rooms
    finally:
        transport.drain_timeout_s = 0
        await transport.aclose()


async def launch(transport: LiveKitTransport, room: str) -> None:
    """LiveKit assigns a job: the SDK's own fake-job path through its THREAD executor."""
    assert transport.server is not None
    await transport.server.simulate_job(room, fake_job=True)


async def join_caller(room: RoomDouble, identity: str = "caller") -> None:
    await until(lambda: room.loop is not None, what="the job connected")
    _, track = await room.act(caller_mic)
    await room.act(room.join, identity, track)


def room_with_caller() -> RoomDouble:
    room = RoomDouble("call")
    _, track = caller_mic()
    room.join("caller", track, subscribed=True)
    return room


def request(job_id: str, answers: list[str], *, assignment_s: float = 0.2, assigned: bool = True) -> JobRequest:
    """A JobRequest as the SDK makes it; accepting waits `assignment_s` for LiveKit's assignment."""
    async def on_reject(terminate: bool) -> None:
        answers.append(f"rejected terminate={terminate}")

    async def on_accept(args: object) -> None:
        answers.append("accepted")
        await asyncio.sleep(assignment_s)
        if not assigned:
            raise TimeoutError("assignment timed out")

    job = agent.Job(id=job_id, type=agent.JobType.JT_ROOM, room=models.Room(name=job_id))
    return JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)


async def test_jobs_waiting_for_their_caller_make_the_worker_unavailable(
        bridge: Bridge, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 8. LiveKit asks a registered worker (the real protocol, through a server double) whether it
    takes a room. With as many jobs as the bridge has sessions still waiting for their callers, the
    worker answers `available=False` (LiveKit routes the room to another bridge) instead of accepting
    and refusing a caller later; when the callers come, every one of them gets a call."""
    async with livekit_agent_server() as lk:
        lk.allow_register.set()
        async with worker(bridge, monkeypatch, lambda: RoomDouble("waiting"), url=lk.url, register=True) as (transport, rooms):
            await asyncio.wait_for(lk.registered.wait(), 10)
            for i in range(MAX_SESSIONS):
                await launch(transport, f"room-{uid}-{i}")
            await until(lambda: len(rooms) == MAX_SESSIONS and all(r.connects for r in rooms), what="jobs connected")
            assert bridge.sessions == {}  # nobody has called yet
            answer = await lk.availability(f"job-{uid}-late", f"room-{uid}-late")
            assert not answer.available, "a full worker offered itself for another room"
            for room in rooms:
                await join_caller(room)
            await until(lambda: len(bridge.sessions) == MAX_SESSIONS, what="every caller's session")
            await asyncio.sleep(0.2)
            assert not any(m["type"] == "error" for room in rooms for m in packets_on(room, "control"))


async def test_a_burst_of_requests_takes_only_the_free_slots(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 8. Requests that arrive together, before any of their jobs started, take one slot each from
    acceptance: of MAX_SESSIONS + 2, exactly MAX_SESSIONS are accepted and the rest are rejected without
    terminating the dispatch (LiveKit offers them to another bridge). A lost assignment frees its slot."""
    async with worker(bridge, monkeypatch, lambda: RoomDouble("unused")) as (transport, _):
        assert transport.worker_options is not None
        on_request = transport.worker_options.request_fnc
        answers: list[str] = []
        await asyncio.gather(*(on_request(request(f"job-{i}", answers)) for i in range(MAX_SESSIONS + 2)))
        assert sorted(answers) == ["accepted"] * MAX_SESSIONS + ["rejected terminate=False"] * 2, answers
        load = transport.worker_options.load_fnc
        assert load() == 1.0  # type: ignore[call-arg]
        lost: list[str] = []
        transport.slots.release("job-0")
        with pytest.raises(TimeoutError):
            await on_request(request("job-lost", lost, assigned=False))
        assert lost == ["accepted"] and len(transport.slots) == MAX_SESSIONS - 1


async def test_stop_drains_a_live_call_until_it_ends(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 9. Stopping the worker (SIGTERM) first drains, as the SDK's runner does: new jobs are
    refused, the live call goes on, and the worker stops as soon as the caller hangs up."""
    async with worker(bridge, monkeypatch, room_with_caller, drain_timeout_s=30) as (transport, rooms):
        await launch(transport, "call")
        await until(lambda: len(bridge.sessions) == 1, what="the call's session")
        sid = next(iter(bridge.sessions))
        stopping = asyncio.create_task(transport.aclose())
        await asyncio.sleep(0.8)
        assert not stopping.done() and sid in bridge.sessions, "stop() hung up a live call"
        assert transport.worker_options is not None
        answers: list[str] = []
        await transport.worker_options.request_fnc(request("job-during-drain", answers))
        assert answers == ["rejected terminate=False"]
        t0 = time.monotonic()
        await rooms[0].act(rooms[0].leave, "caller", Reason.CLIENT_INITIATED)
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - t0 < 5 and bridge.sessions == {}


async def test_drain_is_bounded(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 9. A call that does not end is hung up when the drain timeout passes, not before."""
    async with worker(bridge, monkeypatch, room_with_caller, drain_timeout_s=1.5) as (transport, _):
        await launch(transport, "call")
        await until(lambda: len(bridge.sessions) == 1, what="the call's session")
        t0 = time.monotonic()
        await asyncio.wait_for(transport.aclose(), 15)
        took = time.monotonic() - t0
        assert 1.3 < took < 10, took
        assert bridge.sessions == {}


async def test_a_refused_caller_hears_why_before_the_agent_leaves(bridge: Bridge, uid: str, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Finding 11. A call the bridge cannot take (overloaded pools; a full bridge) sends the caller an
    `error` on `control`, addressed to the caller, before the agent leaves the room; and it is logged."""
    async def overloaded(max_wait_ms: float) -> str:
        return "pool asr is 9 s behind"

    monkeypatch.setattr(bridge.router, "overloaded", overloaded)
    caplog.set_level(logging.WARNING, "voxbus.livekit")
    async with worker(bridge, monkeypatch, room_with_caller) as (transport, rooms):
        await launch(transport, f"room-{uid}")
        await until(lambda: bool(rooms) and rooms[0].packets_when_disconnected is not None, what="the agent left",
                    timeout=10)
        errors = [(orjson_loads(p), dest) for p, _, topic, dest in rooms[0].local_participant.packets if topic == "control"]
        assert errors and errors[0][0]["type"] == "error" and errors[0][0]["reason"] == "overloaded", errors
        assert errors[0][1] == ["caller"] and rooms[0].packets_when_disconnected == len(errors)
        assert any("refused (overloaded)" in r.getMessage() for r in caplog.records)
        assert len(transport.slots) == 0 and bridge.sessions == {}


def orjson_loads(data: bytes) -> dict[str, object]:
    import orjson

    loaded: dict[str, object] = orjson.loads(data)
    return loaded


async def test_worker_is_up_only_once_registered(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 11. start() (after which `voxbus bridge` prints "worker up") returns only once LiveKit has
    answered the worker's registration, not when the worker merely runs."""
    async with livekit_agent_server() as lk:
        transport = LiveKitTransport(bridge, settings=LiveKitSettings(lk.url, "key", SECRET), port=0, drain_timeout_s=0)
        starting = asyncio.create_task(transport.start())
        try:
            await until(lambda: any(m.WhichOneof("message") == "register" for m in lk.received), what="register sent")
            await asyncio.sleep(0.5)
            assert not starting.done(), "the worker said it was up before LiveKit registered it"
            lk.allow_register.set()
            await asyncio.wait_for(starting, 10)
            assert lk.registered.is_set()
        finally:
            if not starting.done():
                starting.cancel()
            await transport.aclose()


async def test_a_second_signal_cuts_the_drain_short(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 9. `hurry()` (what a second SIGTERM/SIGINT calls) ends a drain at once: the calls are hung up."""
    async with worker(bridge, monkeypatch, room_with_caller, drain_timeout_s=60) as (transport, _):
        await launch(transport, "call")
        await until(lambda: len(bridge.sessions) == 1, what="the call's session")
        stopping = asyncio.create_task(transport.aclose())
        await asyncio.sleep(0.5)
        assert not stopping.done()
        transport.hurry()
        await asyncio.wait_for(stopping, 10)
        assert bridge.sessions == {}
