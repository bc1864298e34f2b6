"""Media between a peer connection and a CallSession.

- `pump_caller_audio`: the caller's decoded Opus (48 kHz, stereo or mono) ->
  16 kHz mono int16 -> `CallSession.push_audio`.
- `AgentAudioTrack`: the outgoing track; aiortc calls `recv()` in a loop and
  this paces it at one 20 ms frame per 20 ms of wall clock, taking each frame
  from `CallSession.next_frame()` at the moment it is due (silence when None),
  so an interrupt that flushes the playout is seen by the very next frame.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from shared.protocol import SAMPLE_RATE

from ..audio import Resampler
from ..session import CallSession

log = logging.getLogger("voxbus.webrtc")

FRAME_S = 0.02
MAX_LAG_S = 0.5  # further behind than this (event loop stalled): restart the clock instead of bursting


async def pump_caller_audio(track: MediaStreamTrack, session: CallSession) -> None:
    """Feed the caller's audio track into the session until the track ends or the session closes."""
    resampler: Resampler | None = None
    shape: tuple[int, int] = (0, 0)
    while not session.closed:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if not isinstance(frame, av.AudioFrame) or frame.format.name != "s16":
            continue  # aiortc's audio decoders all give packed s16; anything else is not ours to guess
        channels = len(frame.layout.channels)
        if (frame.sample_rate, channels) != shape:
            shape = (frame.sample_rate, channels)
            resampler = Resampler(frame.sample_rate, SAMPLE_RATE, in_channels=channels)
        assert resampler is not None
        pcm = resampler.push(frame.to_ndarray().reshape(-1))
        if pcm.size:
            session.push_audio(pcm, time.time())


class AgentAudioTrack(MediaStreamTrack):
    """Agent speech for one caller: mono s16 frames at `rate`, paced in real time."""

    kind = "audio"

    def __init__(self, session: CallSession, rate: int = 48_000) -> None:
        super().__init__()
        self.session = session
        self.rate = rate
        self.samples = rate * 20 // 1000
        self.time_base = fractions.Fraction(1, rate)
        self._silence = bytes(self.samples * 2)
        self._start: float | None = None
        self._pts = 0
        self.frames = 0  # frames handed to the encoder
        self.audio_frames = 0  # of which carried agent audio
        self.last_audio_at: dict[int, float] = {}  # turn -> wall clock of its last frame handed out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += self.samples
            delay = self._start + self._pts / self.rate - now
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -MAX_LAG_S:
                self._start = now - self._pts / self.rate
        out = None if self.session.closed else self.session.next_frame()
        pcm = self._silence
        if out is not None and len(out.pcm) == len(self._silence):
            pcm = out.pcm
            self.audio_frames += 1
            self.last_audio_at[out.turn] = time.time()
            if len(self.last_audio_at) > 8:
                del self.last_audio_at[min(self.last_audio_at)]
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        frame.time_base = self.time_base
        self.frames += 1
        return frame
