"""What ops/bench/capacity.py hands around: the run description, the callers' wire format, the environment.

Everything here is plain data, so that it pickles into the spawned bridge and
callers processes: the spec of one run (`CapSpec`), the socket's record
layout shared by the writer (capacity_callers.py) and the reader
(capacity_bridge.py), and what outlives one run (`Env`, for the report).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

FRAME_S = 0.020
IN_RATE = 48_000
IN_FRAME = IN_RATE * 20 // 1000  # 960 samples: one decoded 20 ms WebRTC frame
BATCH_HEAD = struct.Struct("<I")  # frames in the write that follows; 0 ends the stream


def frame_record(channels: int) -> np.dtype:
    """One caller frame on the socket: caller index, frame seq, hand-off time, 20 ms of 48 kHz PCM
    (interleaved when stereo)."""
    return np.dtype([("idx", "<u4"), ("seq", "<u4"), ("ts", "<f8"), ("pcm", "<i2", (IN_FRAME * channels,))])


@dataclass(frozen=True, slots=True)
class CapSpec:
    url: str
    run_id: str
    sessions: int
    seconds: float
    warmup_s: float
    seed: int
    socket_path: str
    pools_file: str
    audio_file: str
    asr_pool: str
    worker_pid: int
    channels: int

    @property
    def frames_per_session(self) -> int:
        return max(1, round((self.warmup_s + self.seconds) / FRAME_S))

    @property
    def session_prefix(self) -> str:
        """Every session id of this run starts with it (the clean-up scans for it)."""
        return f"cap{self.run_id}-"

    def session_ids(self) -> list[str]:
        return [f"{self.session_prefix}{i}" for i in range(self.sessions)]


@dataclass(slots=True)
class Env:
    """What outlives one run: Redis, the scratch directory, the caller audio."""

    url: str
    redis_label: str
    workdir: str
    audio_file: str
    audio_info: dict[str, float]
    anchor: dict[str, Any]
