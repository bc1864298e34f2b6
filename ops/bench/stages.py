"""Benchmark of each model stage on this machine, with the anchors it is judged against.

Stages, all with the real bundled models and used only through their registries:
- VAD: Silero batched across N sessions (BatchVad, one engine call per round),
  fed real speech frame by frame; per session-window engine cost, the whole
  per-tick cost against the 20 ms frame budget, and the unbatched cost measured
  in the same run;
- ASR: faster-whisper on a ~2 s utterance (warm), and WER over ten sentences;
- LLM: llama.cpp time to first token with a warm system prompt, tokens/s;
- TTS: Piper time to first audio for a short sentence, real-time factor.
Test speech is Piper's joe voice (tests/engines/speech.py). A stage that cannot
run is reported under "errors" with its figures null.

    .venv/bin/python ops/bench/stages.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.engines.speech when run as a script

from procstats import emit  # noqa: E402

from shared.stats import percentile  # noqa: E402
from tests.engines.speech import corpus_wer, pad_silence, synthesize_16k, to_float32, to_frames  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "I would like to book a table for two people tomorrow evening.",
    "What time does the next train to Boston leave?",
    "My favorite color is blue.",
    "Can you turn off the lights in the kitchen?",
    "She sells sea shells by the sea shore.",
    "The weather today is sunny and warm.",
    "How much does it cost to ship a package overseas?",
    "Thank you very much for your help.",
]
ASR_CLIP = "The weather today is sunny and warm."  # 2.0 s of speech
SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."
LLM_QUESTIONS = ["What is the capital of France?", "Name three colors.", "How do I boil an egg?", "What is two plus two?"]
TTS_SHORT = "Sure, I can help with that."
TTS_LONG = (
    "Your table for two is booked for tomorrow at seven. "
    "I will send a confirmation by text message. Is there anything else?"
)

ANCHORS: dict[str, Any] = {
    "frame_budget_ms": 20.0,  # real time: one 20 ms frame per session per tick
    "env_notes_vad_ms_per_frame_1thread": 0.17,
    "env_notes_asr_ms_for_1_7s_clip": 360.0,
    "env_notes_llm_ttft_ms": 160.0,
    "env_notes_llm_tokens_per_s": 100.0,
    "env_notes_tts_first_audio_ms": 100.0,
    "env_notes_tts_rtf": [0.05, 0.08],
    "asr_wer_target": 0.10,
}


class _TimedEngine:
    """VadEngine proxy that adds up the time spent inside `score`."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.window_samples, self.new_state = engine, engine.window_samples, engine.new_state
        self.seconds, self.rows, self.calls = 0.0, 0, 0

    def score(self, windows: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        t0 = time.perf_counter()
        result = self.engine.score(windows, states)
        self.seconds += time.perf_counter() - t0
        self.rows, self.calls = self.rows + len(windows), self.calls + 1
        return result


def bench_vad(sessions: int, seconds: float) -> dict[str, Any]:
    import bridge.vad
    from bridge.vad.segmenter import BatchVad

    engine = bridge.vad.create("silero", {"threads": 1})
    speech = [pad_silence(synthesize_16k(text), 0.5, 0.5) for text in SENTENCES]
    audio = np.concatenate(speech)
    ticks = round(seconds * 50)
    rng = np.random.default_rng(7)
    frames = to_frames(audio)
    phases = rng.integers(0, len(frames) - ticks, sessions)
    timed = _TimedEngine(engine)
    vad = BatchVad(timed)  # type: ignore[arg-type]
    for s in range(sessions):
        vad.add(f"s{s}")
    tick_ms: list[float] = []
    events = 0
    for tick in range(ticks):
        t0 = time.perf_counter()
        for s in range(sessions):
            vad.push(f"s{s}", tick, frames[phases[s] + tick])
        events += len(vad.process())
        tick_ms.append((time.perf_counter() - t0) * 1000)
    unbatched = _unbatched_ms_per_window(engine, to_float32(audio[: 16_000 * 3]))
    return {
        "vad_ms_per_frame": round(timed.seconds * 1000 / timed.rows, 4),
        "vad_sessions": sessions,
        "vad_rows_per_call": round(timed.rows / timed.calls, 1),
        "vad_tick_ms_p50": round(statistics.median(tick_ms), 3),
        "vad_tick_ms_p99": percentile(tick_ms, 99),
        "vad_segmenter_ms_per_frame": round((sum(tick_ms) - timed.seconds * 1000) / (sessions * ticks), 4),
        "vad_events": events,
        "anchor_vad_ms_per_frame_unbatched_this_run": round(unbatched, 4),
    }


def _unbatched_ms_per_window(engine: Any, signal: np.ndarray) -> float:
    state = engine.new_state()
    n = len(signal) // 512
    t0 = time.perf_counter()
    for w in range(n):
        _, [state] = engine.score(signal[None, w * 512 : (w + 1) * 512], [state])
    return (time.perf_counter() - t0) * 1000 / n


def bench_asr(repeats: int) -> dict[str, Any]:
    import workers.asr

    asr = workers.asr.create("faster-whisper", {"model": "bundled:whisper-tiny.en"})
    asr.load()
    clip = to_float32(synthesize_16k(ASR_CLIP))
    asr.transcribe(clip)  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        asr.transcribe(clip)
        times.append((time.perf_counter() - t0) * 1000)
    hyps = [asr.transcribe(to_float32(pad_silence(synthesize_16k(t), 0.2, 0.2))).text for t in SENTENCES]
    return {
        "asr_ms": round(statistics.median(times), 1),
        "asr_clip_s": round(len(clip) / 16_000, 2),
        "asr_wer": round(corpus_wer(list(zip(SENTENCES, hyps))), 4),
        "asr_sentences": len(SENTENCES),
    }


async def _bench_llm(repeats: int) -> dict[str, Any]:
    import workers.llm
    from shared.protocol import ChatMessage

    llm = workers.llm.create("llamacpp", {"model": "bundled:smollm2-135m-instruct"})
    await llm.load()
    try:
        ttfts, rates = [], []
        for i in range(repeats + 1):  # the first call warms the system prompt's KV cache
            messages = [
                ChatMessage(session="bench", role="system", text=SYSTEM_PROMPT),
                ChatMessage(session="bench", role="user", text=LLM_QUESTIONS[i % len(LLM_QUESTIONS)]),
            ]
            t0 = time.perf_counter()
            first = 0.0
            deltas = 0
            async for _ in llm.stream(messages, request_id=f"bench-{i}", max_tokens=64, watch=None):
                if not deltas:
                    first = time.perf_counter()
                deltas += 1
            end = time.perf_counter()
            if i and deltas:
                ttfts.append((first - t0) * 1000)
                if deltas > 1:
                    rates.append((deltas - 1) / (end - first))
    finally:
        await llm.aclose()
    return {
        "llm_ttft_ms": round(statistics.median(ttfts), 1),
        "llm_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
    }


def bench_llm(repeats: int) -> dict[str, Any]:
    return asyncio.run(_bench_llm(repeats))


def bench_tts(repeats: int) -> dict[str, Any]:
    import workers.tts

    tts = workers.tts.create("piper", {"model": "bundled:piper-joe-medium"})
    tts.load()
    list(tts.synthesize(TTS_SHORT))  # warm
    firsts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chunks = tts.synthesize(TTS_SHORT)
        next(iter(chunks))
        firsts.append((time.perf_counter() - t0) * 1000)
        for _ in chunks:
            pass
    t0 = time.perf_counter()
    samples = sum(len(chunk) for chunk in tts.synthesize(TTS_LONG))
    elapsed = time.perf_counter() - t0
    return {
        "tts_first_audio_ms": round(statistics.median(firsts), 1),
        "tts_rtf": round(elapsed / (samples / tts.sample_rate), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    stages: dict[str, tuple[Callable[[], dict[str, Any]], list[str]]] = {
        "vad": (lambda: bench_vad(args.sessions, args.seconds), ["vad_ms_per_frame"]),
        "asr": (lambda: bench_asr(args.repeats), ["asr_ms", "asr_wer"]),
        "llm": (lambda: bench_llm(args.repeats), ["llm_ttft_ms", "llm_tokens_per_s"]),
        "tts": (lambda: bench_tts(args.repeats), ["tts_first_audio_ms", "tts_rtf"]),
    }
    report: dict[str, Any] = {}
    errors: dict[str, str] = {}
    unknown = set(args.stages.split(",")) - set(stages)
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(sorted(unknown))}; known: {', '.join(stages)}")
    for name in args.stages.split(","):
        bench, keys = stages[name]
        try:
            report.update(bench())
        except Exception as exc:  # a stage that cannot run is reported, the others still run
            errors[name] = f"{type(exc).__name__}: {exc}"
            report.update({key: None for key in keys})
    report["anchors"] = ANCHORS
    report["errors"] = errors
    report["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sessions", type=int, default=100, help="VAD sessions batched together")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of audio each VAD session gets")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (median)")
    p.add_argument("--stages", default="vad,asr,llm,tts", help="comma-separated subset of vad,asr,llm,tts")
    args = p.parse_args(argv)
    report = run(args)
    emit(report, args.json)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
