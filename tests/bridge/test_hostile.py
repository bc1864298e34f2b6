"""Hostile callers of the direct WebRTC transport: bad signaling, bad control messages, limits.

No worker is needed: agent audio for the "victim" session is written into its
audio.out stream directly, as a TTS worker would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from bridge.core import Bridge
from bridge.transports.webrtc import WebRtcTransport
from shared.protocol import AudioOut, Keys, entry, output_entry_id
from tests.support.bridge import TOKEN, OfferRefused, RtcClient, pools_config, running_bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_SESSIONS = 3
MAX_MESSAGE_BYTES = 512
# A call whose peer vanished without a DTLS close ends when aiortc's ICE consent checks fail (~30 s):
# on a loaded 2-core CI machine an earlier test's call can take that path.
EARLIER_CALLS_S = 45


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(redis_url: str) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    config = pools_config(max_sessions=MAX_SESSIONS, max_datachannel_bytes=MAX_MESSAGE_BYTES)
    async with running_bridge(redis_url, config, connect_timeout_s=3.0) as pair:
        yield pair


async def connected_client(transport: WebRtcTransport, **kwargs: object) -> RtcClient:
    client = RtcClient(transport.url)
    await client.connect(**kwargs)  # type: ignore[arg-type]
    await client.wait_open()
    return client


async def inject_agent_audio(redis_url: str, sid: str, seconds: float, turn: int = 0) -> None:
    """What a TTS worker does: a 220 Hz tone in 200 ms chunks on the session's audio.out."""
    rate = 24_000
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 220 * t) * 6000).astype(np.int16)
    chunk = rate // 5
    client = aioredis.Redis.from_url(redis_url)
    try:
        n = (len(pcm) + chunk - 1) // chunk
        for seq in range(n):
            msg = AudioOut(session=sid, turn=turn, seq=seq, pcm=pcm[seq * chunk:(seq + 1) * chunk].tobytes(), rate=rate,
                           final=seq == n - 1, text="a long test tone" if seq == 0 else "")
            await client.xadd(Keys.audio_out(sid), entry(msg), id=output_entry_id(turn, seq))
    finally:
        await client.aclose()


async def test_signaling_refuses_bad_requests(stack: tuple[Bridge, WebRtcTransport], uid: str) -> None:
    bridge, transport = stack
    url = f"{transport.url}v1/offer"
    before = set(bridge.sessions)
    client = RtcClient(transport.url)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    sdp = client.pc.localDescription.sdp
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases: list[tuple[dict[str, str], object, int, str]] = [
        ({}, {"sdp": sdp, "type": "offer"}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, {"sdp": sdp, "type": "offer"}, 401, "unauthorized"),
        ({"Authorization": TOKEN}, {"sdp": sdp, "type": "offer"}, 401, "unauthorized"),
        (auth, [1, 2], 400, "bad_json"),
        (auth, {"sdp": sdp, "type": "answer"}, 400, "bad_request"),
        (auth, {"sdp": 42, "type": "offer"}, 400, "bad_request"),
        (auth, {"sdp": sdp, "type": "offer", "session_id": "x:{y}"}, 400, "bad_request"),
        (auth, {"sdp": sdp, "type": "offer", "session_id": 7}, 400, "bad_request"),
        (auth, {"sdp": sdp, "type": "offer", "pools": {"asr": "no-such-pool"}}, 400, "bad_request"),
        (auth, {"sdp": sdp, "type": "offer", "pools": ["asr"]}, 400, "bad_request"),
        (auth, {"sdp": "v=0\r\nthis is not sdp\r\n", "type": "offer"}, 400, "no_audio"),
        (auth, {"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n", "type": "offer"},
         400, "bad_offer"),
    ]
    async with aiohttp.ClientSession() as http:
        for headers, body, status, code in cases:
            async with http.post(url, json=body, headers=headers) as resp:
                got = await resp.json()
                assert resp.status == status, (body if not isinstance(body, dict) else {**body, "sdp": "..."}, got)
                assert got["error"] == code and got["message"]
                if status == 401:
                    assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer")
        async with http.post(url, data=b"{not json", headers=auth) as resp:
            assert resp.status == 400
        async with http.get(f"{transport.url}healthz") as resp:
            health = await resp.json()
            assert resp.status == 200 and health["ok"] is True
        async with http.get(f"{transport.url}v1/config") as resp:
            assert resp.status == 401
        async with http.get(f"{transport.url}v1/config", headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["ice_servers"] == []
    await client.aclose()
    assert set(bridge.sessions) == before, "a refused offer left a session behind"
    assert not set(transport.calls) - before

    taken = await connected_client(transport, session_id=f"t{uid}-dup")
    again = RtcClient(transport.url)
    with pytest.raises(OfferRefused) as refused:
        await again.connect(session_id=f"t{uid}-dup")
    assert refused.value.status == 409 and refused.value.body["error"] == "session_exists"
    await asyncio.gather(taken.aclose(), again.aclose())


async def test_hostile_messages_never_hurt_anyone(stack: tuple[Bridge, WebRtcTransport], redis_url: str,
                                                  counter: Callable[..., float], uid: str) -> None:
    bridge, transport = stack
    attacker = await connected_client(transport, session_id=f"t{uid}-a")
    victim = await connected_client(transport, session_id=f"t{uid}-b")
    try:
        await inject_agent_audio(redis_url, victim.session_id, seconds=6.0)
        await victim.wait_for(lambda: len(victim.audio_frames()) >= 10, 20, "the victim hears its agent")
        base = {r: counter("voxbus_control_rejected_total", reason=r) for r in
                ("too_large", "bad_json", "not_object", "bad_type", "unknown_type", "foreign_session",
                 "bad_field", "tokens_channel_input", "unknown_channel")}

        attacker.send("x" * (MAX_MESSAGE_BYTES + 1))
        attacker.send({"type": "interrupt", "pad": "é" * (MAX_MESSAGE_BYTES // 2 + 8)})  # few characters, too many bytes
        attacker.send("{not json")
        attacker.send(b"\xff\xfe\x00garbage")
        attacker.send("[1, 2, 3]")
        attacker.send('"interrupt"')
        attacker.send("null")
        attacker.send({"type": 5})
        attacker.send({"type": ["interrupt"]})
        attacker.send({"kind": "interrupt"})
        attacker.send({"type": "shutdown"})
        attacker.send({"type": "interrupt", "session": victim.session_id})
        attacker.send({"type": "interrupt", "session_id": victim.session_id})
        attacker.send({"type": "ping", "id": {"nested": [1]}})
        attacker.tokens_ch.send('{"type": "interrupt"}')
        evil = attacker.pc.createDataChannel("evil")
        pong = await attacker.ping(1)
        assert pong["type"] == "pong"
        await attacker.wait_for(lambda: evil.readyState == "closed", 10, "the unknown channel to be closed")

        call_a, call_b = transport.calls[attacker.session_id], transport.calls[victim.session_id]
        rejected = call_a.control.rejected
        assert rejected["too_large"] == 2 and rejected["bad_json"] == 2 and rejected["not_object"] == 3
        assert rejected["bad_type"] == 3 and rejected["unknown_type"] == 1 and rejected["foreign_session"] == 2
        assert rejected["bad_field"] == 1 and rejected["unknown_channel"] == 1
        await attacker.wait_for(lambda: rejected["tokens_channel_input"] == 1, 5, "the tokens-channel input counted")
        for reason, value in base.items():
            assert counter("voxbus_control_rejected_total", reason=reason) > value, reason
        assert call_a.control.accepted["interrupt"] == 0

        # the victim: still speaking, nothing flushed or cancelled, nothing told to its client
        heard_before = len(victim.audio_frames())
        await asyncio.sleep(0.5)
        assert len(victim.audio_frames()) > heard_before, "the victim's agent audio stopped"
        victim_session = bridge.sessions[victim.session_id]
        assert victim_session.playout.min_turn == 0 and not victim_session._times(0).interrupted
        assert not victim.controls("interrupted") and call_b.control.rejected == {}
        assert attacker.session_id in bridge.sessions and attacker.pc.connectionState == "connected"

        # the attacker's own interrupt, naming itself, is honoured (for itself only)
        attacker.send({"type": "interrupt", "session": attacker.session_id})
        await attacker.ping(2)
        assert call_a.control.accepted["interrupt"] == 1
        assert victim_session.playout.min_turn == 0
    finally:
        await asyncio.gather(attacker.aclose(), victim.aclose())


async def test_max_sessions(stack: tuple[Bridge, WebRtcTransport], counter: Callable[..., float], uid: str) -> None:
    bridge, transport = stack
    clients: list[RtcClient] = []
    probe = RtcClient(transport.url)
    await probe.wait_for(lambda: not bridge.sessions, EARLIER_CALLS_S, f"earlier calls to close: {list(bridge.sessions)}")
    await probe.aclose()
    try:
        for i in range(MAX_SESSIONS - len(bridge.sessions)):
            client = RtcClient(transport.url)
            clients.append(client)
            await client.connect(session_id=f"t{uid}-m{i}")
        assert len(bridge.sessions) == MAX_SESSIONS
        rejected = counter("voxbus_sessions_rejected_total", reason="max_sessions")
        extra = RtcClient(transport.url)
        clients.append(extra)
        with pytest.raises(OfferRefused) as refused:
            await extra.connect(session_id=f"t{uid}-over")
        assert refused.value.status == 503 and refused.value.body["error"] == "too_many_sessions"
        assert str(MAX_SESSIONS) in refused.value.body["message"]
        assert counter("voxbus_sessions_rejected_total", reason="max_sessions") == rejected + 1
        assert len(bridge.sessions) == MAX_SESSIONS
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def test_session_closes_when_peer_leaves(stack: tuple[Bridge, WebRtcTransport], uid: str) -> None:
    bridge, transport = stack
    client = RtcClient(transport.url)
    await client.wait_for(lambda: not bridge.sessions, EARLIER_CALLS_S, f"earlier calls to close: {list(bridge.sessions)}")
    await client.connect(session_id=f"t{uid}-bye")
    await client.wait_open()
    assert client.session_id in bridge.sessions
    await client.aclose()
    await client.wait_for(lambda: client.session_id not in bridge.sessions, 15, "the session to close")
    assert client.session_id not in transport.calls

    # an offer whose caller never connects is dropped after connect_timeout_s (3 s here)
    ghost = RtcClient(transport.url)
    await ghost.pc.setLocalDescription(await ghost.pc.createOffer())
    body = {"sdp": ghost.pc.localDescription.sdp, "type": "offer", "session_id": f"t{uid}-ghost"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{transport.url}v1/offer", json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
    assert f"t{uid}-ghost" in bridge.sessions
    await ghost.aclose()  # never applies the answer: no ICE, no DTLS
    await ghost.wait_for(lambda: f"t{uid}-ghost" not in bridge.sessions, 15, "the unconnected session to close")
