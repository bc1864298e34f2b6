"""The peer of ops/bench/latency.py: pipecat 1.14 on the same models, fed the same audio, timed the same way.

One pipecat pipeline per peer row, fed in real time as a call would be:

    mic source -> WhisperSTTService -> user aggregator (Silero VAD + turn strategy)
      -> OpenAILLMService (llama.cpp's OpenAI-compatible server) -> PiperTTSService -> sink -> assistant aggregator

- the models are the bundled ones voxbus uses: faster-whisper tiny.en int8 (beam 1: pipecat has no
  beam option, so the model's `transcribe` gets `beam_size=1`), SmolLM2-135M served by
  `python -m workers.llm.llama_server`, Piper joe-medium loaded from its package folder (no download);
  Silero VAD and Smart Turn v3.2 are the copies in pipecat's wheel (Smart Turn is the file voxbus uses);
- the source is a FrameProcessor that pushes 20 ms InputAudioRawFrames of 16 kHz audio at real-time pace
  (silence, or the same pink noise as the voxbus caller, between questions); pipecat 1.14 runs the VAD
  in the user aggregator, which emits the VAD and user-turn frames the STT and the turn strategy need;
- voice-to-voice runs from the moment the frame holding the question's last voiced sample (found on the
  clean clip, as the voxbus caller does) leaves the source to the first TTSAudioRawFrame at the sink;
  an observer times the other frames (pipeline clock) for the breakdown;
- before each question the context is emptied and the llama.cpp server gets one untimed request (the
  system prompt and another question): the system prompt stays warm, as in voxbus's engine, but the
  server cannot reuse an identical earlier prompt.

Importing this module imports pipecat (an ImportError says which of its dependencies is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

logger.remove()  # before pipecat is imported: it logs a banner, then every frame at DEBUG
logger.add(sys.stderr, level=os.environ.get("VOXBUS_PEER_LOG", "ERROR"))

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.clocks.system_clock import SystemClock
from pipecat.frames import frames as F
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.workers.runner import WorkerRunner

RATE = 16_000
FRAME = 320  # 20 ms at 16 kHz
PEERS: dict[str, tuple[float | None, bool]] = {  # row -> (VAD stop_secs, None: pipecat's; turn ended by Smart Turn?)
    "pipecat-default": (None, True),
    "pipecat-vad-0.3": (0.3, False),
}
PEER_DESCRIPTIONS = {
    "pipecat-default": "pipecat's default turn handling: Silero VAD (stop_secs 0.2) + Smart Turn v3 stop strategy",
    "pipecat-vad-0.3": "turn ended by pipecat's Silero VAD alone at stop_secs 0.3 (no Smart Turn, no extra timeout)",
}
WARM_QUESTION = "Say hello."
# The frames the observer times, and the Marks field each one sets (first push after the voiced end).
TIMED = ((F.VADUserStoppedSpeakingFrame, "vad_stop"), (F.TranscriptionFrame, "transcript"),
         (F.UserStoppedSpeakingFrame, "turn_end"), (F.LLMTextFrame, "first_token"), (F.TTSStartedFrame, "tts_start"),
         (F.LLMFullResponseEndFrame, "response_end"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """llama.cpp's OpenAI-compatible server on the bundled SmolLM2, started as tests/engines/test_openai.py does."""

    def __init__(self, model: str, system_prompt: str, n_ctx: int = 2048) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model, self.system_prompt, self.n_ctx = model, system_prompt, n_ctx
        self.proc: subprocess.Popen[bytes] | None = None
        fd, log = tempfile.mkstemp(prefix="voxbus-llama-", suffix=".log")
        os.close(fd)
        self.log = Path(log)

    def __enter__(self) -> LlamaServer:  # noqa: PYI034
        import httpx

        cmd = [sys.executable, "-m", "workers.llm.llama_server", "--model", self.model, "--n_ctx", str(self.n_ctx),
               "--host", "127.0.0.1", "--port", str(self.port), "--verbose", "False"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/models", timeout=1).status_code < 500:
                    return self
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"llama.cpp server did not listen within 120 s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)

    async def warm(self) -> None:
        """One untimed request, so the next prompt is not an exact copy of the one the server last saw."""
        import httpx

        body = {"model": self.model, "max_tokens": 2, "temperature": 0.0,
                "messages": [{"role": "system", "content": self.system_prompt},
                             {"role": "user", "content": WARM_QUESTION}]}
        async with httpx.AsyncClient(timeout=60) as client:
            (await client.post(f"{self.base_url}/chat/completions", json=body)).raise_for_status()


@dataclass
class Marks:
    """Monotonic times (s) of one question's events, each the first after the voiced end."""

    voiced_end: float | None = None
    vad_stop: float | None = None
    transcript: float | None = None
    turn_end: float | None = None
    first_token: float | None = None
    tts_start: float | None = None
    first_audio: float | None = None
    response_end: float | None = None
    last_audio: float | None = None
    text: list[str] = field(default_factory=list)


class Clock(SystemClock):
    """pipecat's clock, which also knows its start on time.monotonic()'s scale."""

    origin = 0.0

    def start(self) -> None:
        super().start()  # type: ignore[no-untyped-call]
        self.origin = time.monotonic() - self.get_time() / 1e9


class Mic(FrameProcessor):
    """The source: 20 ms InputAudioRawFrames in real time, queued speech else silence, noise mixed into both."""

    def __init__(self, marks: Marks) -> None:
        super().__init__(name="mic")
        self.marks = marks
        self.queue = np.zeros(0, np.int16)
        self.noise: np.ndarray | None = None  # int32 loop at 16 kHz
        self.mark_at: int | None = None  # queue length at which the voiced end has left
        self.started = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def process_frame(self, frame: F.Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, F.StartFrame) and self.task is None:
            self.task = self.create_task(self._feed(), "mic")
            self.started.set()
        elif isinstance(frame, (F.EndFrame, F.CancelFrame)) and self.task is not None:
            task, self.task = self.task, None
            await self.cancel_task(task)

    async def _feed(self) -> None:
        start, n, pos = time.monotonic(), 0, 0
        while True:
            chunk, self.queue = self.queue[:FRAME], self.queue[FRAME:]
            mixed = np.pad(chunk, (0, FRAME - len(chunk))).astype(np.int32)
            if self.noise is not None:
                mixed += self.noise[(pos + np.arange(FRAME)) % len(self.noise)]
                pos += FRAME
            pcm = np.clip(mixed, -32768, 32767).astype(np.int16)
            await self.push_frame(F.InputAudioRawFrame(audio=pcm.tobytes(), sample_rate=RATE, num_channels=1))
            if self.mark_at is not None and len(self.queue) <= self.mark_at:
                self.marks.voiced_end, self.mark_at = time.monotonic(), None
            n += 1
            await asyncio.sleep(max(0.0, start + n * FRAME / RATE - time.monotonic()))

    def play(self, pcm: np.ndarray) -> None:
        from bridge.caller import voiced_end

        end = voiced_end(pcm)
        self.mark_at = len(pcm) - (end if end is not None else len(pcm))
        self.queue = pcm.astype(np.int16)


class Sink(FrameProcessor):
    """Right after the TTS: the question's first TTSAudioRawFrame ends its voice-to-voice time."""

    def __init__(self, marks: Marks) -> None:
        super().__init__(name="sink")
        self.marks = marks

    async def process_frame(self, frame: F.Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, F.TTSAudioRawFrame):
            now = time.monotonic()
            if self.marks.first_audio is None and self.marks.voiced_end is not None:
                self.marks.first_audio = now
            self.marks.last_audio = now
        await self.push_frame(frame, direction)


class Tap(BaseObserver):
    """The breakdown: when each TIMED frame type was first pushed after the voiced end (pipeline clock)."""

    def __init__(self, marks: Marks, clock: Clock) -> None:
        super().__init__()
        self.marks, self.clock = marks, clock

    async def on_push_frame(self, data: FramePushed) -> None:
        at = self.clock.origin + data.timestamp / 1e9
        if self.marks.voiced_end is None or at < self.marks.voiced_end:
            return
        for kind, attr in TIMED:
            if isinstance(data.frame, kind) and getattr(self.marks, attr) is None:
                setattr(self.marks, attr, at)
        if isinstance(data.frame, F.LLMTextFrame) and data.first_push:
            self.marks.text.append(data.frame.text)


class Beam1Whisper(WhisperSTTService):
    """pipecat's Whisper service with greedy decoding (beam 1), as voxbus's ASR pool runs it."""

    def _load(self) -> None:
        super()._load()  # type: ignore[no-untyped-call]
        assert self._model is not None
        self._model.transcribe = functools.partial(self._model.transcribe, beam_size=1)


def build(name: str, llama: LlamaServer, marks: Marks) -> tuple[PipelineWorker, Mic, LLMContext]:
    """The pipeline of peer row `name`: the bundled models, pipecat's own services and turn handling."""
    from shared.models import resolve

    stop_secs, smart_turn = PEERS[name]
    vad = SileroVADAnalyzer(params=VADParams(stop_secs=stop_secs) if stop_secs is not None else None)
    strategies = None if smart_turn else UserTurnStrategies(
        stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.0)])
    context = LLMContext()
    pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        vad_analyzer=vad, user_turn_strategies=strategies))
    stt = Beam1Whisper(settings=WhisperSTTService.Settings(model=str(resolve("bundled:whisper-tiny.en"))),
                       device="cpu", compute_type="int8")
    llm = OpenAILLMService(api_key="sk-local", base_url=llama.base_url, settings=OpenAILLMService.Settings(
        model=llama.model, system_instruction=llama.system_prompt, temperature=0.0, max_tokens=120))
    piper = Path(resolve("bundled:piper-joe-medium"))
    tts = PiperTTSService(settings=PiperTTSService.Settings(voice=piper.stem), download_dir=piper.parent)
    mic, clock = Mic(marks), Clock()  # type: ignore[no-untyped-call]
    pipeline = Pipeline([mic, stt, pair.user(), llm, tts, Sink(marks), pair.assistant()])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=RATE), clock=clock,
                            observers=[Tap(marks, clock)], idle_timeout_secs=None, enable_rtvi=False)
    return worker, mic, context


async def run_peer(name: str, questions: list[np.ndarray], plan: list[tuple[str, float | None, int]], *,
                   llama: LlamaServer, warmup: bool = True, gap_s: float = 1.0,
                   timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Peer row `name`: one pipeline; every question once per (condition, snr, run) of `plan`; a row each."""
    from bridge.demo_audio import noise_for

    marks = Marks()
    worker, mic, context = build(name, llama, marks)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    rows: list[dict[str, Any]] = []
    try:
        await asyncio.wait_for(mic.started.wait(), 60)
        steps = ([("warmup", None, 0, 0)] if warmup else []) + [
            (cond, snr, run, i) for cond, snr, run in plan for i in range(len(questions))]
        for cond, snr, run, i in steps:
            mic.noise = noise_for(snr, questions, RATE).astype(np.int32) if snr is not None else None
            context.set_messages([])
            await llama.warm()
            await asyncio.sleep(gap_s)
            marks.__init__()  # type: ignore[misc]  # a fresh set of marks, the same object everyone holds
            mic.play(np.concatenate([np.zeros(RATE // 2, np.int16), questions[i]]))
            row = await _one_question(marks, timeout_s)
            if cond != "warmup":
                rows.append({"peer": name, "condition": cond, "noise_snr_db": snr, "run": run, "question": i + 1,
                             **row})
    finally:
        await worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(running, 15)
    return rows


async def _one_question(marks: Marks, timeout_s: float) -> dict[str, Any]:
    """Wait for the first audio, then for the reply to end; the question's figures (None where not seen)."""
    deadline = time.monotonic() + timeout_s
    while marks.first_audio is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    while time.monotonic() < deadline and marks.first_audio is not None and (
            marks.response_end is None or time.monotonic() - (marks.last_audio or 0) < 0.5):
        await asyncio.sleep(0.05)

    def ms(a: float | None, b: float | None) -> float | None:
        return round((b - a) * 1000, 1) if a is not None and b is not None else None

    return {
        "answered": marks.first_audio is not None,
        "agent_text": "".join(marks.text).strip(),
        "voice_to_voice_ms": ms(marks.voiced_end, marks.first_audio),
        "endpoint_ms": ms(marks.voiced_end, marks.turn_end),
        "response_ms": ms(marks.turn_end, marks.first_audio),
        "asr_ms": ms(marks.vad_stop, marks.transcript),
        "llm_ttft_ms": ms(marks.turn_end, marks.first_token),
        "tts_first_audio_ms": ms(marks.tts_start, marks.first_audio),
    }
