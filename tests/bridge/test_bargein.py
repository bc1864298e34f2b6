"""Barge-in over real WebRTC: the caller's `interrupt` stops the agent at once, and the context keeps
only what the caller heard.
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
from shared.protocol import ChatMessage, Keys, TokenChunk, decode, decode_entry, turn_range
from tests.engines.speech import normalize_words, pad_silence, synthesize_16k
from tests.support.bridge import RtcClient, WorkerSet, running_bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = "Tell me about the history of the Roman Empire."
HEARD_BEFORE_INTERRUPT_FRAMES = 50  # 1 s of agent speech at the caller
AFTER_INTERRUPT_WATCH_S = 2.0
# frames already handed to aiortc + its 20 ms packetization + the caller's jitter buffer (4 packets)
# + decode: anything audible past this bound would be audio the bridge sent after the interrupt
TRANSPORT_BOUND_S = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(redis_url: str, workers: WorkerSet) -> AsyncIterator[tuple[Bridge, WebRtcTransport]]:
    async with running_bridge(redis_url, workers.config()) as pair:
        yield pair


async def test_interrupt_stops_agent_and_keeps_heard_text(stack: tuple[Bridge, WebRtcTransport], redis_url: str,
                                                          uid: str) -> None:
    bridge, transport = stack
    client = RtcClient(transport.url)
    redis = aioredis.Redis.from_url(redis_url)
    sid = f"t{uid}-barge"
    try:
        await client.connect(session_id=sid)
        await client.wait_open()
        call = transport.calls[sid]
        session = bridge.sessions[sid]

        t_speak = time.time()
        client.mic.play(pad_silence(synthesize_16k(QUESTION), 0.5, 0.2))
        await client.wait_for(lambda: len(client.audio_frames(since=t_speak)) >= HEARD_BEFORE_INTERRUPT_FRAMES, 120,
                              "the agent's reply at the caller")
        turn = session.agent_turn
        assert session.state.value == "agent_speaking", "the reply ended before the interrupt: nothing left to cut"

        t_interrupt = time.time()
        client.send({"type": "interrupt"})
        await client.wait_for(lambda: client.controls("interrupted"), 10, "the interrupt acknowledgement")
        await asyncio.sleep(AFTER_INTERRUPT_WATCH_S)

        received_at = call.control.interrupt_at
        assert received_at is not None and call.control.accepted["interrupt"] == 1
        # bridge side: not one frame of the cancelled turn handed to the encoder after the interrupt arrived
        assert session.playout.stale_frames == 0
        last_sent = call.agent_track.last_audio_at.get(turn, 0.0)
        assert last_sent <= received_at, f"turn {turn} audio sent {1000 * (last_sent - received_at):.0f} ms after the interrupt"
        # caller side: sound stops within the transport's own delay
        after = client.audio_frames(since=t_interrupt)
        last_heard = max((t for t, _ in after), default=t_interrupt)
        print(f"\ninterrupt -> last agent audio frame at client: {1000 * (last_heard - t_interrupt):.0f} ms, "
              f"stale frames: {session.playout.stale_frames} "
              f"({len(after)} audible frames in flight after the interrupt; bridge received it "
              f"{1000 * (received_at - t_interrupt):.1f} ms after sending, last frame left the bridge "
              f"{1000 * (received_at - last_sent):.1f} ms before that)")
        assert last_heard - t_interrupt < TRANSPORT_BOUND_S
        assert not client.audio_frames(since=t_interrupt + TRANSPORT_BOUND_S)
        assert client.controls("interrupted")[-1]["turn"] == turn
        late_tokens = [m for t, m in client.tokens if m["t"] == turn and t > received_at + 0.1]
        assert not late_tokens, f"tokens of the cancelled turn forwarded after the interrupt: {late_tokens}"

        # context: the interrupted assistant turn holds only the heard prefix of the reply
        start, end = turn_range(turn)
        tokens = [decode_entry(f) for _, f in await redis.xrange(Keys.tokens(sid), start, end)]
        generated = "".join(t.text for t in sorted((t for t in tokens if isinstance(t, TokenChunk)), key=lambda t: t.seq))
        deadline = time.monotonic() + 5
        assistant: list[ChatMessage] = []
        while time.monotonic() < deadline and not assistant:
            ctx = [decode(raw) for raw in await redis.lrange(Keys.ctx(sid), 0, -1)]
            assistant = [m for m in ctx if isinstance(m, ChatMessage) and m.role == "assistant" and m.turn == turn]
            await asyncio.sleep(0.1)
        assert len(assistant) == 1, assistant
        heard = assistant[0]
        print(f"generated before the cancel: {generated.strip()!r}\ncontext keeps (heard): {heard.text!r}")
        assert heard.interrupted
        heard_words, all_words = normalize_words(heard.text), normalize_words(generated)
        assert heard_words and heard_words == all_words[: len(heard_words)], "the heard text is not a prefix of the reply"
        assert len(heard_words) < len(all_words) or session.times[turn].interrupted
    finally:
        await client.aclose()
        await redis.aclose()
