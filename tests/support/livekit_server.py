"""The agent-dispatch side of a LiveKit server, as a double: the `/agent` websocket a worker registers on.

No LiveKit server can run on the test machines. This speaks the real protocol
(`livekit.protocol.agent` messages over a binary websocket, what livekit-server
does for workers) to the real AgentServer, just enough for one worker:

- the worker's `register` gets a `RegisterWorkerResponse`, only once
  `allow_register` is set (a server that is slow to answer, or not yet reachable);
- `availability(job_id, room)` sends an `AvailabilityRequest` and returns the
  worker's `AvailabilityResponse` (no assignment follows: a job accepted here
  is never launched);
- every message of the worker is kept in `received`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web
from livekit.protocol import agent, models


class LiveKitAgentServerDouble:
    def __init__(self) -> None:
        self.allow_register = asyncio.Event()
        self.registered = asyncio.Event()
        self.received: list[agent.WorkerMessage] = []
        self._ws: web.WebSocketResponse | None = None
        self._answers: dict[str, asyncio.Future[agent.AvailabilityResponse]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/agent", self._agent)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}"
        return self.url

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _agent(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            message = agent.WorkerMessage()
            message.ParseFromString(msg.data)
            self.received.append(message)
            which = message.WhichOneof("message")
            if which == "register":
                await self.allow_register.wait()
                reply = agent.ServerMessage(register=agent.RegisterWorkerResponse(
                    worker_id="AW_double", server_info=models.ServerInfo(version="double")))
                await ws.send_bytes(reply.SerializeToString())
                self.registered.set()
            elif which == "availability":
                fut = self._answers.pop(message.availability.job_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(message.availability)
        return ws

    async def availability(self, job_id: str, room: str, timeout_s: float = 10.0) -> agent.AvailabilityResponse:
        """Offer a job to the worker, as LiveKit does when a room needs an agent; the worker's answer."""
        assert self._ws is not None, "no worker connected"
        fut: asyncio.Future[agent.AvailabilityResponse] = asyncio.get_running_loop().create_future()
        self._answers[job_id] = fut
        job = agent.Job(id=job_id, type=agent.JobType.JT_ROOM, room=models.Room(sid=f"RM_{job_id}", name=room))
        await self._ws.send_bytes(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)).SerializeToString())
        return await asyncio.wait_for(fut, timeout_s)

    def statuses(self) -> list[agent.UpdateWorkerStatus]:
        return [m.update_worker for m in self.received if m.WhichOneof("message") == "update_worker"]


@contextlib.asynccontextmanager
async def livekit_agent_server() -> AsyncIterator[LiveKitAgentServerDouble]:
    server = LiveKitAgentServerDouble()
    await server.start()
    try:
        yield server
    finally:
        server.allow_register.set()
        await server.aclose()
