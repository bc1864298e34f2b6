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
from shared.caller_audio import to_pcm
from shared.logs import RateLimitedLog
from shared.opus import PREROLL
from shared.protocol import (
    AudioFrame,
    Keys,
    OpusFrame,
    ProtocolError,
    RejectReason,
    decode_entry,
    frame_entry_id,
    frame_seq,
)
from shared.redis_conn import xrange

log = logging.getLogger("voxbus.stage.frames")
_limited = RateLimitedLog(log)

MAX_RANGE_FRAMES = 30_000  # 10 minutes of 20 ms frames: a job naming more is refused


async def read_frames(redis: aioredis.Redis, session: str, start_seq: int, end_seq: int, *, turn: int = -1) -> np.ndarray:
    """Frames [start_seq, end_seq] of `session`'s audio.in as float32 samples in [-1, 1)."""
    if not 0 <= start_seq <= end_seq or end_seq - start_seq + 1 > MAX_RANGE_FRAMES:
        raise ValueError(f"frame range {start_seq}..{end_seq} of session {session} is empty, negative or over "
                         f"{MAX_RANGE_FRAMES} frames")
    # A few frames before the range too: an Opus decoder starting mid-call settles on them.
    read_from = max(0, start_seq - PREROLL)
    entries = await xrange(redis, Keys.audio_in(session), frame_entry_id(read_from), frame_entry_id(end_seq))
    frames: list[AudioFrame | OpusFrame] = []
    for entry_id, fields in entries:
        try:
            frame = decode_entry(fields)
        except ProtocolError as exc:
            count_rejected("audio.in", exc.reason)
            _limited.warning("frame", "skipping a malformed frame in %s: %s", session, exc)
            continue
        if not isinstance(frame, AudioFrame | OpusFrame):
            count_rejected("audio.in", RejectReason.WRONG_TYPE)
            continue
        if frame.session != session:
            count_rejected("audio.in", RejectReason.WRONG_SESSION)
            continue
        seq = frame_seq(entry_id)
        if frame.seq != seq or not read_from <= seq <= end_seq or (frames and seq <= frames[-1].seq):
            # The id is what XRANGE selected on; a frame claiming another seq was not written by a bridge.
            count_rejected("audio.in", RejectReason.WRONG_SEQ)
            continue
        frames.append(frame)
    got = sum(1 for f in frames if f.seq >= start_seq)
    if got < end_seq - start_seq + 1:
        log.warning("session %s turn %d: %d of %d frames present", session, turn, got, end_seq - start_seq + 1)
    # Missing frames become silence inside the range: timing holds, never longer than the range.
    pcm = to_pcm(frames, start_seq, end_seq)
    return pcm.astype(np.float32) / 32768.0
