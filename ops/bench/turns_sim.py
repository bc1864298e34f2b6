"""The simulated ingest path of ops/bench/turns.py: VAD, end-of-turn model, preemptive ASR, turn machine.

One corpus file plays through the bridge's real code in simulated time: 20 ms
frames into `BatchVad.feed` (Silero, the product's EndpointConfig), its
events mapped to the turn machine exactly as `bridge.session` does, a `Tick`
every frame. Frame n is "now" = (n + 1) * 20 ms, when its last sample was
captured. The machine's jobs run on the real models:

- `ScoreTurn`: Smart Turn v3.2 on what the session would send (500 ms before
  the utterance up to the newest frame, at most 8 s); the verdict arrives at
  now + its cost.
- `SubmitAsr`: faster-whisper tiny.en, int8, beam 1, as the asr-cpu pool of
  ops/pools/cpu.toml runs it, on the same frame range the ASR worker reads;
  the transcript arrives at its start + its cost, through one slot as in that
  pool (a job waits for the one before; one whose turn was cancelled before
  it started is skipped). The end-of-turn rule reads a speculative turn's
  transcript; every turn's tells when its reply could start (`ready`).

A cost is the measured time of that very call unless a fixed one is given
(`--cost-ms`, `--asr-cost-ms`): on a shared machine the measured time varies,
and with it which verdicts beat the caller's next word. Every result is kept
per (file, frame range), so all configurations see the same model outputs.
Redis and the worker queues' bus hops are not simulated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from turn_corpus import Item

from shared.protocol import FRAME_SAMPLES, SAMPLE_RATE, SpeechEnd, SpeechPause, SpeechStart

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
EOT_MODEL = ("smart-turn", {"model": "bundled:smart-turn-v3.2", "threads": 1})
ASR_POOL = "asr-cpu"  # the pool of ops/pools/cpu.toml whose engine and options the preemptive ASR uses


@dataclass
class FileResult:
    item: Item
    ends: list[tuple[float, str]]  # (decision time s, "vad" | "model")
    end_turns: list[int] = field(default_factory=list)  # the turn id of each end
    transcript_at: dict[int, float] = field(default_factory=dict)  # turn -> when its final transcript arrived
    trace: list[dict[str, Any]] = field(default_factory=list)  # what the machine heard and decided, in order

    @property
    def true_end(self) -> float:
        return float(self.item.label["turn_end_s"])

    @property
    def early(self) -> list[float]:
        return [t for t, _ in self.ends if t < self.true_end]

    @property
    def first_after(self) -> tuple[float, str] | None:
        return next(((t, by) for t, by in self.ends if t >= self.true_end), None)

    @property
    def ready_delay_s(self) -> float | None:
        """From the true end to when the reply could start: the first end after it, and its transcript in."""
        for (t, _), turn in zip(self.ends, self.end_turns, strict=True):
            if t >= self.true_end:
                heard = self.transcript_at.get(turn)
                return None if heard is None else max(t, heard) - self.true_end
        return None

    @property
    def delay_s(self) -> float:
        after = self.first_after
        return after[0] - self.true_end if after else len(self.item.audio) / SAMPLE_RATE - self.true_end


def _clip(audio: np.ndarray, start: int, end: int) -> np.ndarray:
    return audio[start * FRAME_SAMPLES : (end + 1) * FRAME_SAMPLES].astype(np.float32) / 32768.0


@dataclass
class Scorer:
    """Smart Turn, with each clip's verdict and measured cost kept: every setup sees the same decisions."""

    engine: Any
    fixed_cost_s: float | None = None  # deliver verdicts after this instead of the measured time
    costs_s: list[float] = field(default_factory=list)  # every real batch-of-1 call
    clips: list[np.ndarray] = field(default_factory=list)
    _seen: dict[tuple[str, int, int], tuple[float, float]] = field(default_factory=dict)

    def score(self, name: str, audio: np.ndarray, start: int, end: int) -> tuple[float, float]:
        """(probability, cost s) for frames start..end (inclusive) of `audio`."""
        key = (name, start, end)
        if key not in self._seen:
            clip = _clip(audio, start, end)
            t0 = time.perf_counter()
            prob = float(self.engine.predict([clip])[0])
            cost = time.perf_counter() - t0
            self.costs_s.append(cost)
            self.clips.append(clip)
            self._seen[key] = (prob, cost if self.fixed_cost_s is None else self.fixed_cost_s)
        return self._seen[key]


@dataclass
class Transcriber:
    """The preemptive ASR: each range's transcript and measured cost kept, like `Scorer`."""

    engine: Any
    language: str | None = None
    fixed_cost_s: float | None = None
    costs_s: list[float] = field(default_factory=list)
    _seen: dict[tuple[str, int, int], tuple[str, float]] = field(default_factory=dict)

    def transcribe(self, name: str, audio: np.ndarray, start: int, end: int) -> tuple[str, float]:
        key = (name, start, end)
        if key not in self._seen:
            t0 = time.perf_counter()
            text = self.engine.transcribe(_clip(audio, start, end), self.language).text
            cost = time.perf_counter() - t0
            self.costs_s.append(cost)
            self._seen[key] = (text, cost if self.fixed_cost_s is None else self.fixed_cost_s)
        return self._seen[key]

    @property
    def texts(self) -> list[str]:
        return [text for text, _ in self._seen.values()]


def load_models(asr_cost_s: float | None, eot_cost_s: float | None) -> tuple[Any, Scorer, Transcriber]:
    """Silero VAD, Smart Turn and the asr-cpu pool's faster-whisper, loaded and warmed up."""
    import bridge.vad
    import workers.asr
    import workers.eot
    from shared.config import load_config

    vad = bridge.vad.create("silero", {})
    eot = workers.eot.create(*EOT_MODEL)
    eot.load()
    eot.predict([np.zeros(SAMPLE_RATE, np.float32)])  # the first call pays for allocations
    pool = load_config().pool(ASR_POOL)
    asr = workers.asr.create(pool.engine, dict(pool.options))
    asr.load()
    asr.transcribe(np.zeros(SAMPLE_RATE, np.float32), pool.options.get("language"))
    return vad, Scorer(eot, eot_cost_s), Transcriber(asr, pool.options.get("language"), asr_cost_s)


def vad_events(engine: Any, config: Any, audio: np.ndarray) -> dict[int, list[Any]]:
    """The VAD's events for `audio` fed one 20 ms frame per tick, by the frame seq that produced them."""
    from bridge.vad.segmenter import BatchVad
    from tests.engines.speech import to_frames

    vad = BatchVad(engine, config)
    vad.add("bench")
    out: dict[int, list[Any]] = {}
    for seq, pcm in enumerate(to_frames(audio)):
        events, rejected = vad.feed([("bench", [(seq, pcm, (seq + 1) * FRAME_S)])])
        if rejected:
            raise RuntimeError(f"VAD rejected frame {seq}: {rejected}")
        if events:
            out[seq] = [event for _, event in events]
    return out


class _Replay:
    """One file through a fresh TurnMachine, as bridge.session drives it (see `simulate`)."""

    def __init__(self, item: Item, turn_config: Any, scorer: Scorer, asr: Transcriber | None) -> None:
        from bridge.turns import TurnMachine

        self.item, self.scorer, self.asr = item, scorer, asr
        self.machine = TurnMachine(turn_config)
        self.pending: list[Any] = []  # verdicts and transcripts on their way, each with its arrival time `now`
        self.asr_queue: list[tuple[float, Any]] = []  # (queued at, SubmitAsr) not started yet
        self.asr_free_at = 0.0
        self.cancelled = -1
        self.result = FileResult(item, [])

    def start_asr_jobs(self, now: float) -> None:
        """The one ASR slot takes queued jobs in order once free (a cancelled one is skipped)."""
        from bridge import turn_events as ev

        while self.asr is not None and self.asr_queue:
            queued_at, job = self.asr_queue[0]
            start = max(queued_at, self.asr_free_at)
            if start > now + 1e-9:
                return
            self.asr_queue.pop(0)
            if job.turn <= self.cancelled:
                continue
            text, cost = self.asr.transcribe(self.item.name, self.item.audio, job.start_frame, job.end_frame)
            self.asr_free_at = start + cost
            self.pending.append(ev.TranscriptIn(self.asr_free_at, job.turn, text))

    def handle(self, event: Any, seq: int) -> None:
        from bridge import turn_events as ev
        from bridge.session import EOT_PRE_SPEECH_FRAMES, EOT_WINDOW_FRAMES

        trace = self.result.trace
        for cmd in self.machine.handle(event):
            if isinstance(cmd, ev.ScoreTurn):
                end = max(cmd.end_frame, seq)  # the newest frame: the model hears the silence too
                start = max(cmd.start_frame - EOT_PRE_SPEECH_FRAMES, end - EOT_WINDOW_FRAMES + 1, 0)
                prob, cost = self.scorer.score(self.item.name, self.item.audio, start, end)
                self.pending.append(ev.EotVerdict(event.now + cost, cmd.turn, prob))
            elif isinstance(cmd, ev.SubmitAsr):
                self.asr_queue.append((event.now, cmd))
            elif isinstance(cmd, ev.CancelTurn):
                self.cancelled = max(self.cancelled, cmd.turn)
            elif isinstance(cmd, ev.Record) and cmd.kind == "turn_end":
                self.result.ends.append((event.now, cmd.data["by"]))
                self.result.end_turns.append(cmd.turn)
                trace.append({"t": round(event.now, 3), "turn_end": cmd.data["by"], "turn": cmd.turn})
            elif isinstance(cmd, ev.Record) and cmd.kind in ("eot", "eot_cue"):
                value = cmd.data["prob"] if cmd.kind == "eot" else cmd.data["cue"]
                trace.append({"t": round(event.now, 3), cmd.kind: value, "turn": cmd.turn})
        if isinstance(event, ev.TranscriptIn):
            self.result.transcript_at.setdefault(event.turn, event.now)
            trace.append({"t": round(event.now, 3), "transcript": event.text, "turn": event.turn})
        self.start_asr_jobs(event.now)

    def arrivals(self, now: float, seq: int) -> None:
        """What arrived between the last tick and this one, in order (a job's result may start the next)."""
        self.start_asr_jobs(now)
        while due := [p for p in self.pending if p.now <= now + 1e-9]:
            first = min(due, key=lambda p: p.now)
            self.pending.remove(first)
            self.handle(first, seq)


def simulate(item: Item, events: dict[int, list[Any]], turn_config: Any, scorer: Scorer,
             asr: Transcriber | None) -> FileResult:
    """Replay one file's VAD events through a fresh TurnMachine, as bridge.session drives it.

    `asr` None: no transcripts."""
    from bridge import turn_events as ev

    replay = _Replay(item, turn_config, scorer, asr)
    for seq in range(-(-len(item.audio) // FRAME_SAMPLES)):
        now = (seq + 1) * FRAME_S
        replay.arrivals(now, seq)
        for e in events.get(seq, ()):
            if isinstance(e, SpeechStart):
                replay.handle(ev.VadStart(now, e.frame), seq)
            elif isinstance(e, SpeechPause):
                replay.handle(ev.VadResume(now) if e.resumed else ev.VadPause(now, e.start_frame, e.end_frame), seq)
            elif isinstance(e, SpeechEnd):
                replay.handle(ev.VadEnd(now, e.start_frame, e.end_frame, e.silence_ms), seq)
        replay.handle(ev.Tick(now), seq)
    return replay.result
