"""A real call over real WebRTC: aiortc caller on loopback -> bridge (Silero VAD) -> worker processes
(faster-whisper, llama.cpp, Piper) over the shared Redis -> agent audio and tokens back to the caller.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiortc import codecs as rtc_codecs
from aiortc.codecs import get_encoder

from bridge.core import Bridge
from bridge.transports import rtc_setup
from bridge.transports.webrtc import WebRtcTransport
from tests.engines.speech import pad_silence, synthesize_16k, wer
from tests.support.bridge import RtcClient, WorkerSet, running_bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = "What is the capital of France?"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(redis_url: str, workers: WorkerSet) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    async with running_bridge(redis_url, workers.config()) as pair:
        yield pair


def opus_fmtp(sdp: str) -> str:
    pt = re.search(r"a=rtpmap:(\d+) opus/48000", sdp, re.IGNORECASE)
    assert pt, f"no Opus in SDP:\n{sdp}"
    fmtp = re.search(rf"a=fmtp:{pt.group(1)} (.*)", sdp)
    return fmtp.group(1).strip() if fmtp else ""


async def test_auth_page_and_health(stack: tuple[Bridge, WebRtcTransport]) -> None:
    _, transport = stack
    client = RtcClient(transport.url, token=None)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{transport.url}v1/offer", json={"sdp": client.pc.localDescription.sdp, "type": "offer"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        async with http.get(transport.url) as resp:
            assert resp.status == 200 and "<html" in (await resp.text()).lower()
        for asset in ("app.js", "style.css"):
            async with http.get(f"{transport.url}static/{asset}") as resp:
                assert resp.status == 200, asset
        async with http.get(f"{transport.url}static/../../core.py") as resp:
            assert resp.status in (403, 404)
        async with http.get(f"{transport.url}healthz") as resp:
            assert resp.status == 200 and (await resp.json())["ok"] is True
    await client.aclose()


async def test_opus_fec_encoder_makes_redundant_frames() -> None:
    """The encoder aiortc will use really carries FEC: libopus leaves CELT-only mode (TOC config >= 16)."""
    rtc_setup.enable_opus_fec()
    opus = next(c for c in rtc_codecs.CODECS["audio"] if c.mimeType.lower() == "audio/opus")
    assert opus.parameters.get("useinbandfec") == 1
    encoder = get_encoder(opus)
    assert isinstance(encoder, rtc_setup.FecOpusEncoder)
    import av

    t = np.arange(960 * 25) / 48_000
    tone = (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16)
    configs = set()
    for i in range(25):
        frame = av.AudioFrame.from_ndarray(tone[i * 960:(i + 1) * 960].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48_000, i * 960
        for payload in encoder.encode(frame)[0]:
            configs.add(payload[0] >> 3)
    assert configs and max(configs) < 16, f"Opus TOC configs {sorted(configs)}: CELT-only frames carry no FEC"


async def test_call_turn_over_webrtc(stack: tuple[Bridge, WebRtcTransport], uid: str) -> None:
    bridge, transport = stack
    speech = pad_silence(synthesize_16k(QUESTION), 0.5, 0.2)
    client = RtcClient(transport.url)
    try:
        answer = await client.connect(session_id=f"t{uid}-call")
        # FEC negotiated both ways, jitter target applied to the caller's audio receiver
        assert "useinbandfec=1" in opus_fmtp(client.offer_sdp)
        assert "useinbandfec=1" in opus_fmtp(answer["sdp"]), answer["sdp"]
        await client.wait_open()
        call = transport.calls[client.session_id]
        receiver = next(t.receiver for t in call.pc.getTransceivers() if t.kind == "audio")
        jb = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        want = rtc_setup.jitter_buffer_for(bridge.config.bridge.jitter_target_ms)
        assert (jb._prefetch, jb.capacity) == (want._prefetch, want.capacity)
        hello = await client.wait_for(lambda: client.controls("session"), 10, "the session hello")
        assert hello[0]["session"] == client.session_id

        t_speak = time.time()
        client.mic.play(speech)
        final = await client.wait_for(
            lambda: [m for m in client.controls("transcript") if m.get("final") and m["text"].strip()], 60,
            "the user's transcript")
        heard = final[0]["text"]
        print(f"\nuser said {QUESTION!r}, bridge heard {heard!r} (WER {wer(QUESTION, heard):.2f})")
        assert wer(QUESTION, heard) <= 0.2, heard

        await client.wait_for(lambda: len(client.audio_frames(since=t_speak)) >= 25, 90, "0.5 s of agent audio")
        await client.wait_for(lambda: client.tokens, 30, "LLM tokens on llm_tokens")
        metrics = await client.wait_for(
            lambda: [m for m in client.controls("turn_metrics") if m.get("agent_text")], 90, "the turn's metrics")
        await client.wait_for(lambda: client.controls("state")[-1]["state"] == "listening", 60, "the agent to finish")
        states = [m["state"] for m in client.controls("state")]
        assert {"user_speaking", "thinking", "agent_speaking"} <= set(states), states

        tokens = sorted((m["t"], m["s"], m["d"]) for _, m in client.tokens)
        assert all(isinstance(m["f"], bool) for _, m in client.tokens)
        reply = "".join(d for _, _, d in tokens)
        m = metrics[-1]
        print(f"agent replied {m['agent_text']!r} ({len(client.tokens)} token messages, "
              f"{len(client.audio_frames(since=t_speak))} audio frames at the caller)")
        print("waterfall: " + ", ".join(f"{k}={m.get(k)}" for k in
                                        ("endpoint_ms", "asr_ms", "llm_ttft_ms", "tts_first_audio_ms", "response_ms")))
        assert reply.strip() == m["agent_text"]  # loopback loses nothing, even on the lossy channel
        assert m["response_ms"] is not None and m["user_text"] == heard
        assert bridge.sessions[client.session_id].playout.stale_frames == 0
    finally:
        await client.aclose()
