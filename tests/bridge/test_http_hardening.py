"""The signaling server against slow, many and greedy clients, and hostile bytes (the real aiohttp server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from bridge.core import Bridge
from bridge.transports.http_guard import OfferLimiter
from bridge.transports.webrtc import WebRtcTransport
from tests.support.bridge import TOKEN, RtcClient, pools_config, running_bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(redis_url: str) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    config = pools_config(http_header_timeout_s=1.5, http_body_timeout_s=1.0, http_max_connections=40,
                          offer_rate_per_s=0.5, offer_burst=4, max_pending_calls=3, connect_timeout_s=30.0)
    async with running_bridge(redis_url, config) as pair:
        yield pair


async def raw(transport: WebRtcTransport, data: bytes, wait_s: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", transport.port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), wait_s)
    finally:
        writer.close()


async def test_slow_headers_are_cut_at_the_deadline(stack: tuple[Bridge, WebRtcTransport]) -> None:
    """Slowloris: 30 connections sending one header line a second. Before: all still open after 60 s."""
    _, transport = stack
    conns = [await asyncio.open_connection("127.0.0.1", transport.port) for _ in range(30)]
    t0 = time.monotonic()
    for _, writer in conns:
        writer.write(b"POST /v1/offer HTTP/1.1\r\nHost: x\r\n")

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        for i in range(10):
            try:
                writer.write(f"X-Slow-{i}: {i}\r\n".encode())
                await writer.drain()
            except ConnectionError:
                return time.monotonic() - t0
            if await _closed(reader, 1.0):
                return time.monotonic() - t0
        return float("inf")

    closed_after = await asyncio.gather(*(trickle(r, w) for r, w in conns))
    for _, writer in conns:
        writer.close()
    assert max(closed_after) < 4.0, closed_after


async def _closed(reader: asyncio.StreamReader, wait_s: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), wait_s) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_connections_past_the_cap_get_a_503(stack: tuple[Bridge, WebRtcTransport]) -> None:
    _, transport = stack
    held = [await asyncio.open_connection("127.0.0.1", transport.port) for _ in range(40)]
    try:
        await asyncio.sleep(0.1)
        reply = await raw(transport, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply, reply
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.2)
    assert (await raw(transport, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")


async def test_hostile_bytes_get_4xx_never_500(stack: tuple[Bridge, WebRtcTransport]) -> None:
    _, transport = stack
    reply = await raw(transport, b"POST /v1/offer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                                 b"Content-Length: 2\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    nested = b"[" * 100_000 + b"]" * 100_000
    reply = await raw(transport, b"POST /v1/offer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(nested) + nested)
    assert reply.startswith(b"HTTP/1.1 400") and b"bad_json" in reply, reply[:200]
    reply = await raw(transport, b"POST /v1/offer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                      + b"\r\nContent-Length: 100\r\n\r\n{\"sdp\":")  # then nothing: the body never completes
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


async def test_offers_are_rate_limited_per_client(stack: tuple[Bridge, WebRtcTransport]) -> None:
    _, transport = stack
    transport.offer_limiter = OfferLimiter(0.5, 4)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(6):
            async with http.post(f"{transport.url}v1/offer", json={"sdp": "x", "type": "offer"}, headers=AUTH) as resp:
                statuses.append(resp.status)
                retry = resp.headers.get("Retry-After")
    assert statuses[:4] == [400] * 4 and statuses[4:] == [429, 429], statuses
    assert retry is not None and int(retry) >= 1
    transport.offer_limiter = OfferLimiter(100.0, 100)


async def test_calls_that_never_connect_are_capped(stack: tuple[Bridge, WebRtcTransport]) -> None:
    """40 offers that never connect were accepted in 0.2 s and held 20 s each; now at most 3 wait."""
    bridge, transport = stack
    transport.offer_limiter = OfferLimiter(100.0, 100)
    clients = [RtcClient(transport.url) for _ in range(5)]
    refused = []
    for client in clients:
        await client.pc.setLocalDescription(await client.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{transport.url}v1/offer", headers=AUTH,
                                 json={"sdp": client.pc.localDescription.sdp, "type": "offer"}) as resp:
                if resp.status != 200:
                    refused.append((resp.status, (await resp.json())["error"]))
    try:
        assert refused == [(503, "too_many_pending")] * 2, refused
    finally:
        for client in clients:
            await client.aclose()
        for call in list(transport.calls.values()):
            await call.close("test over")


async def test_the_page_is_served_safely_and_metrics_need_the_token(stack: tuple[Bridge, WebRtcTransport]) -> None:
    _, transport = stack
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{transport.url}?token={TOKEN}") as resp:
            assert resp.status == 200
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        async with http.get(f"{transport.url}metrics") as resp:
            assert resp.status == 401
        async with http.get(f"{transport.url}metrics", headers=AUTH) as resp:
            assert resp.status == 200 and "voxbus_active_sessions" in await resp.text()
    assert "history.replaceState" in (ROOT / "bridge/web/app.js").read_text()  # the page drops the token from its URL


async def test_a_silent_call_ends_at_the_idle_timeout(redis_url: str) -> None:
    async with running_bridge(redis_url, pools_config(idle_timeout_s=1.5)) as (bridge, transport):
        client = RtcClient(transport.url)
        try:
            await client.connect()
            await client.wait_open()
            client.mic.stop()  # the peer stays connected but sends no audio at all
            await client.wait_for(lambda: client.controls("ended"), 10, "the bridge to end the call")
            assert "no audio" in client.controls("ended")[0]["reason"]
            await client.wait_for(lambda: client.session_id not in bridge.sessions, 10, "the session to close")
        finally:
            await client.aclose()
