"""Reading a job's frame range of a session's caller audio (audio.in) as float32 samples.

Jobs carry references, not audio: [start_seq, end_seq] of audio.in, read with
one XRANGE thanks to explicit frame ids. Each entry is checked: its frame must
name this session and carry the seq its entry id says; anything else is
skipped and counted. Frames missing inside the range (trimmed, lost) become
silence so timing holds, but never more of it than the range itself holds,
however a frame's seq claims otherwise.
"""

from __future__ import annotations

import logging

import numpy as np
import redis.asyncio as aioredis

from shared.bus.entries import count_rejected
from shared.logs import RateLimitedLog
from shared.protocol import (
    FRAME_BYTES,
    AudioFrame,
    Keys,
    ProtocolError,
    RejectReason,
    decode_entry,
    frame_entry_id,
    frame_seq,
)

log = logging.getLogger("voxbus.stage.frames")
_limited = RateLimitedLog(log)

MAX_RANGE_FRAMES = 30_000  # 10 minutes of 20 ms frames: a job naming more is refused


async def read_frames(redis: aioredis.Redis, session: str, start_seq: int, end_seq: int, *, turn: int = -1) -> np.ndarray:
    """Frames [start_seq, end_seq] of `session`'s audio.in as float32 samples in [-1, 1)."""
    if not 0 <= start_seq <= end_seq or end_seq - start_seq + 1 > MAX_RANGE_FRAMES:
        raise ValueError(f"frame range {start_seq}..{end_seq} of session {session} is empty, negative or over "
                         f"{MAX_RANGE_FRAMES} frames")
    entries = await redis.xrange(Keys.audio_in(session), frame_entry_id(start_seq), frame_entry_id(end_seq))
    expected = end_seq - start_seq + 1
    pcm = bytearray()
    got = 0
    next_seq = start_seq
    for entry_id, fields in entries:
        try:
            frame = decode_entry(fields)
        except ProtocolError as exc:
            count_rejected("audio.in", exc.reason)
            _limited.warning("frame", "skipping a malformed frame in %s: %s", session, exc)
            continue
        if not isinstance(frame, AudioFrame):
            count_rejected("audio.in", RejectReason.WRONG_TYPE)
            continue
        if frame.session != session:
            count_rejected("audio.in", RejectReason.WRONG_SESSION)
            continue
        seq = frame_seq(entry_id)
        if frame.seq != seq or not start_seq <= seq <= end_seq or seq < next_seq:
            # The id is what XRANGE selected on; a frame claiming another seq was not written by a bridge.
            count_rejected("audio.in", RejectReason.WRONG_SEQ)
            continue
        if seq > next_seq:  # a gap: keep timing with silence (bounded by the range, checked above)
            pcm += bytes(FRAME_BYTES * (seq - next_seq))
        pcm += frame.pcm
        next_seq = seq + 1
        got += 1
    if got < expected:
        log.warning("session %s turn %d: %d of %d frames present", session, turn, got, expected)
    return np.frombuffer(bytes(pcm), dtype=np.int16).astype(np.float32) / 32768.0
