"""A simulated caller: an aiortc peer that talks to a bridge over real WebRTC.

It plays 16 kHz clips through a microphone track in real time, records the
agent's audio (arrival time, loudness and the samples themselves), the token
deltas and the control messages, and can send control messages such as
{"type": "interrupt"}. `voxbus demo` and the tests use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from .audio import Resampler

RATE = 48_000
FRAME = 960  # 20 ms at 48 kHz
_TIME_BASE = fractions.Fraction(1, RATE)
SILENCE_RMS = 30.0  # decoded Opus of digital silence stays far below this; speech is far above


def voiced_end(pcm16k: np.ndarray, threshold_db: float = -45.0, win: int = 160) -> int | None:
    """Index just past the last 10 ms window louder than `threshold_db` (dBFS), or None."""
    n = len(pcm16k) // win
    if n == 0:
        return None
    x = pcm16k[: n * win].astype(np.float64).reshape(n, win) / 32768.0
    db = 10 * np.log10(np.mean(x**2, axis=1) + 1e-12)
    loud = np.nonzero(db > threshold_db)[0]
    return int((loud[-1] + 1) * win) if loud.size else None


class SpeechTrack(MediaStreamTrack):
    """A microphone that plays queued 16 kHz clips in real time (48 kHz mono frames), then silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue = np.zeros(0, dtype=np.int16)
        self._start: float | None = None
        self._pts = 0
        self._queued_total = 0  # samples ever queued
        self._marks: list[tuple[int, str]] = []  # (sample position, name) to timestamp when sent
        self.marks: dict[str, float] = {}  # name -> wall clock when its sample left the mic
        self.playing_until = 0.0
        self._noise: np.ndarray | None = None  # background noise mixed into every frame (48 kHz int16 loop)
        self._noise_pos = 0

    def set_noise(self, noise48k: np.ndarray | None) -> None:
        """Mix this loop of noise (48 kHz int16) into everything the mic sends, silence included."""
        self._noise = None if noise48k is None or not len(noise48k) else noise48k.astype(np.int16)
        self._noise_pos = 0

    def play(self, pcm16k: np.ndarray, mark_voiced_end: str | None = None) -> None:
        """Queue a clip; with `mark_voiced_end`, record when its last voiced sample is sent."""
        up = Resampler(16_000, RATE)
        pcm = np.concatenate([up.push(pcm16k), up.flush()])
        if mark_voiced_end:
            end = voiced_end(pcm16k)
            if end is not None:
                self._marks.append((self._queued_total + end * RATE // 16_000, mark_voiced_end))
        self._queue = np.concatenate([self._queue, pcm])
        self._queued_total += len(pcm)
        self.playing_until = max(self.playing_until, time.time()) + len(self._queue) / RATE

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += FRAME
            delay = self._start + self._pts / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        chunk, self._queue = self._queue[:FRAME], self._queue[FRAME:]
        if len(chunk) < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), dtype=np.int16)])
        if self._noise is not None:
            idx = (self._noise_pos + np.arange(FRAME)) % len(self._noise)
            self._noise_pos = (self._noise_pos + FRAME) % len(self._noise)
            chunk = np.clip(chunk.astype(np.int32) + self._noise[idx], -32768, 32767).astype(np.int16)
        consumed = self._queued_total - len(self._queue)  # queued samples that have left the mic
        for pos, name in list(self._marks):
            if pos <= consumed:
                self.marks[name] = time.time()
                self._marks.remove((pos, name))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        return frame


class OfferRefused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class RtcClient:
    """A caller peer: mic track, the two client-created channels, agent audio recorder."""

    def __init__(self, base_url: str, token: str | None, *, keep_audio: bool = False,
                 jitter_target_ms: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = SpeechTrack()
        self.pc.addTrack(self.mic)
        self.tokens_ch = self.pc.createDataChannel("llm_tokens", ordered=False, maxRetransmits=0)
        self.control_ch = self.pc.createDataChannel("control")
        self.control: list[tuple[float, dict[str, Any]]] = []
        self.tokens: list[tuple[float, dict[str, Any]]] = []
        self.audio: list[tuple[float, float]] = []  # (arrival wall clock, RMS) per received frame
        self.keep_audio = keep_audio
        self.jitter_target_ms = jitter_target_ms  # None: aiortc's default (~80 ms)
        self.pcm: list[np.ndarray] = []  # received agent audio, 48 kHz mono, when keep_audio
        self.session_id = ""
        self.answer_sdp = ""
        self.offer_sdp = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self.control_ch.on("message", lambda m: self._record(self.control, m))
        self.tokens_ch.on("message", lambda m: self._record(self.tokens, m))
        self.pc.on("track", self._on_track)

    def _record(self, into: list[tuple[float, dict[str, Any]]], raw: str | bytes) -> None:
        into.append((time.time(), json.loads(raw)))
        self._changed.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if self.jitter_target_ms is not None:
            from .transports.rtc_setup import set_jitter_target

            for transceiver in self.pc.getTransceivers():
                if transceiver.receiver.track is track:
                    set_jitter_target(transceiver.receiver, self.jitter_target_ms)
        self._tasks.append(asyncio.ensure_future(self._read_audio(track)))

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        down: Resampler | None = None
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            pcm = frame.to_ndarray().reshape(-1)
            channels = len(frame.layout.channels)
            if channels > 1:
                pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
            self.audio.append((time.time(), float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if pcm.size else 0.0))
            if self.keep_audio:
                if down is None:
                    down = Resampler(frame.sample_rate, RATE)
                self.pcm.append(down.push(pcm.astype(np.int16)))
            self._changed.set()

    async def connect(self, session_id: str | None = None, **extra: Any) -> dict[str, Any]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.offer_sdp = self.pc.localDescription.sdp
        body = {"sdp": self.offer_sdp, "type": "offer", **extra}
        if session_id is not None:
            body["session_id"] = session_id
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.base_url}/v1/offer", json=body, headers=headers) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise OfferRefused(resp.status, answer)
        self.session_id, self.answer_sdp = answer["session_id"], answer["sdp"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        return cast(dict[str, Any], answer)

    async def wait_open(self, timeout: float = 20.0) -> None:
        await self.wait_for(lambda: self.control_ch.readyState == "open" and self.tokens_ch.readyState == "open",
                            timeout, "data channels open")

    async def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; last control messages: "
                                   f"{[m for _, m in self.control][-12:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))

    def controls(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.control if m.get("type") == kind]

    def send(self, msg: dict[str, Any] | str | bytes) -> None:
        self.control_ch.send(json.dumps(msg) if isinstance(msg, dict) else msg)

    async def ping(self, ping_id: int, timeout: float = 10.0) -> dict[str, Any]:
        """Round trip on `control`: everything sent before it has been handled when the pong comes."""
        self.send({"type": "ping", "id": ping_id})
        pong = await self.wait_for(lambda: next((m for m in self.controls("pong") if m.get("id") == ping_id), None),
                                   timeout, f"pong {ping_id}")
        return cast(dict[str, Any], pong)

    def audio_frames(self, since: float = 0.0) -> list[tuple[float, float]]:
        """Received frames carrying sound (not silence) that arrived after `since`."""
        return [(t, rms) for t, rms in self.audio if t > since and rms > SILENCE_RMS]

    def received_pcm(self) -> np.ndarray:
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, dtype=np.int16)

    async def aclose(self) -> None:
        self.mic.stop()
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
