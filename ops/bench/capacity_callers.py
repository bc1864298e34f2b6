"""The load generator of ops/bench/capacity.py: N simulated callers in one process of their own.

- N simulated callers each hand the bridge one 20 ms frame of 48 kHz PCM, by
  default interleaved stereo (what aiortc's Opus decoder gives; `--channels 1`
  for mono), every 20 ms, in real time, each with its own random phase inside
  the 20 ms period; frames that fall due together (within 0.5 ms) go in one
  socket write, never later than due. The audio is real speech with
  pauses: Piper-synthesized sentences (tests/engines/speech.py) separated by
  0.8-2.5 s of silence, with a faint noise floor, looped, every caller starting
  at its own random offset, so callers do not all speak at once.
- Each write on the Unix stream socket carries every frame due at that moment
  with its caller index, sequence number and hand-off time (`time.time()` just
  before the write: the frame's capture time), see capacity_spec.frame_record.
- late_frames: frames a caller handed over more than 20 ms after their due
  time (the load generator fell behind real time: the offered load was lower
  than N callers). pacing_lag_*: hand-off minus due time over all frames.
- CPU: `resource.getrusage` of this process over the measured window.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
from capacity_spec import BATCH_HEAD, FRAME_S, IN_FRAME, IN_RATE, CapSpec, frame_record
from procstats import cpu_seconds

from shared.stats import percentile

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I would like to book a table for two people tomorrow evening.",
    "What time does the next train to Boston leave?",
    "Can you turn off the lights in the kitchen?",
    "How much does it cost to ship a package overseas?",
    "Thank you very much for your help.",
]


def build_caller_audio(path: str, seed: int) -> dict[str, float]:
    """The looped 48 kHz caller track: sentences, pauses of 0.8-2.5 s, a -70 dBFS noise floor."""
    from bridge.audio import Resampler
    from tests.engines.speech import synthesize_16k

    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    speech = 0
    for text in SENTENCES:
        voiced = synthesize_16k(text)
        speech += len(voiced)
        parts += [voiced, np.zeros(round(rng.uniform(0.8, 2.5) * 16_000), dtype=np.int16)]
    audio16 = np.concatenate(parts)
    up = Resampler(16_000, IN_RATE)
    audio48 = np.concatenate([up.push(audio16), up.flush()]).astype(np.float64)
    audio48 += rng.normal(0.0, 10.0, audio48.size)
    np.save(path, np.clip(np.round(audio48), -32768, 32767).astype(np.int16))
    return {"loop_s": round(audio16.size / 16_000, 2), "speech_share": round(speech / audio16.size, 3)}


@dataclass(slots=True)
class CallerLog:
    handed: int = 0
    late: int = 0
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    writes: int = 0


class Callers:
    """Every caller's schedule: frame k of caller i is due at t0 + phase[i] + k * 20 ms."""

    def __init__(self, spec: CapSpec) -> None:
        audio = np.load(spec.audio_file)
        self.length = len(audio)
        self.audio = np.concatenate([audio, audio[:IN_FRAME]])  # a frame never wraps around the loop
        rng = np.random.default_rng(spec.seed)
        phases = rng.uniform(0.0, FRAME_S, spec.sessions)
        self.offsets = rng.integers(0, self.length, spec.sessions)
        self.order = np.argsort(phases).astype(np.uint32)
        self.phases = phases[self.order]
        self.n = spec.sessions
        self.frames = spec.frames_per_session
        self.ramp = np.arange(IN_FRAME)
        self.record = frame_record(spec.channels)
        self.channels = spec.channels
        self.k = 0  # frame seq now being handed out
        self.i = 0  # position in `order` within frame k

    @property
    def finished(self) -> bool:
        return self.k >= self.frames

    def next_due(self, t0: float) -> float:
        return t0 + self.k * FRAME_S + float(self.phases[self.i])

    def take_due(self, t0: float, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(caller indices, seqs, due times) of every frame due by `now` not handed out yet."""
        idx: list[np.ndarray] = []
        seq: list[np.ndarray] = []
        due: list[np.ndarray] = []
        while self.k < self.frames:
            base = t0 + self.k * FRAME_S
            j = int(np.searchsorted(self.phases, now - base, side="right"))
            if j > self.i:
                idx.append(self.order[self.i : j])
                seq.append(np.full(j - self.i, self.k, dtype=np.uint32))
                due.append(base + self.phases[self.i : j])
            if j < self.n:
                self.i = j
                break
            self.k, self.i = self.k + 1, 0
        if not idx:
            empty = np.zeros(0, dtype=np.uint32)
            return empty, empty, np.zeros(0)
        return np.concatenate(idx), np.concatenate(seq), np.concatenate(due)

    def records(self, idx: np.ndarray, seq: np.ndarray) -> np.ndarray:
        recs = np.empty(len(idx), dtype=self.record)
        recs["idx"], recs["seq"] = idx, seq
        starts = (self.offsets[idx] + seq.astype(np.int64) * IN_FRAME) % self.length
        mono = self.audio[starts[:, None] + self.ramp]
        recs["pcm"] = np.repeat(mono, self.channels, axis=1) if self.channels > 1 else mono
        return recs


def run_callers(spec: CapSpec, conn: Connection) -> CallerLog:
    """Hand every frame over at its due time (never skipping), all frames due at once in one write."""
    callers = Callers(spec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.connect(spec.socket_path)
    conn.send("ready")
    t0: float = conn.recv()
    log = CallerLog()
    lags: list[np.ndarray] = []
    measure_from = t0 + spec.warmup_s
    cpu0 = wall0 = None
    time.sleep(max(0.0, t0 - time.time()))
    while not callers.finished:
        now = time.time()
        if cpu0 is None and now >= measure_from:
            cpu0, wall0 = cpu_seconds(), now
        idx, seq, due = callers.take_due(t0, now)
        if idx.size:
            recs = callers.records(idx, seq)
            ts = time.time()
            recs["ts"] = ts
            sock.sendall(BATCH_HEAD.pack(len(recs)) + recs.tobytes())
            lags.append(ts - due)
            log.handed += len(recs)
            log.writes += 1
        if not callers.finished:
            # at least 0.5 ms between writes: callers' frames due within it go in one write
            time.sleep(max(0.0005, callers.next_due(t0) - time.time()))
    sock.sendall(BATCH_HEAD.pack(0))
    end = time.time()
    log.cpu_s = cpu_seconds() - (cpu0 if cpu0 is not None else 0.0)
    log.wall_s = end - (wall0 if wall0 is not None else t0)
    lag = np.concatenate(lags) if lags else np.zeros(0)
    log.late = int((lag > FRAME_S).sum())
    log.lag_p99_ms = percentile(lag * 1000, 99)
    log.lag_max_ms = percentile(lag * 1000, 100)
    sock.close()
    return log


def callers_main(spec: CapSpec, conn: Connection) -> None:
    """The callers process (spawned): run, then send the CallerLog back."""
    conn.send(run_callers(spec, conn))
    conn.close()
