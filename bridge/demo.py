"""`voxbus demo` and `voxbus up`: the whole stack on one machine, and a caller that talks to it.

`up` starts embedded Redis (or uses REDIS_URL), one CPU worker per stage with
the bundled models and the bridge with its browser page, and runs until Ctrl-C.
`demo` does the same, then a simulated caller (an aiortc peer over real
WebRTC) asks a spoken question, waits for the spoken answer and reports the
turn's latency waterfall; with --barge-in-at it talks over the answer and
reports how fast the agent went quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("voxbus.demo")

DEFAULT_QUESTION = "What is the capital of France?"
BARGE_IN_TEXT = "Wait, stop please."
SILENCE_BEFORE_S = 0.5
SILENCE_AFTER_S = 2.5
CALLER_JITTER_MS = 40


# ------------------------------------------------------------------ audio in and out

def read_audio_16k(path: str | Path) -> np.ndarray:
    """Any audio file PyAV can decode, as 16 kHz mono int16."""
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise ValueError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16_000)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise ValueError(f"{path}: no audio samples")
    return np.concatenate(chunks).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype(np.int16).tobytes())


def synthesize_16k(text: str, cache_name: str) -> np.ndarray:
    """A spoken utterance from the bundled Piper voice, cached after the first run."""
    from shared.models import cache_dir
    from workers import tts

    from .audio import Resampler

    path = cache_dir() / "demo" / f"{cache_name}.wav"
    if path.exists():
        return read_audio_16k(path)
    print(f"voxbus: synthesizing the demo utterance {text!r} (first run)", file=sys.stderr)
    engine = tts.create("piper", {"model": "bundled:piper-joe-medium"})
    engine.load()
    audio = np.concatenate([np.asarray(c, dtype=np.int16) for c in engine.synthesize(text)])
    down = Resampler(engine.sample_rate, 16_000)
    pcm = np.concatenate([down.push(audio), down.flush()])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, pcm, 16_000)
    return pcm


def with_silence(pcm: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    return np.concatenate([np.zeros(int(16_000 * before_s), np.int16), pcm, np.zeros(int(16_000 * after_s), np.int16)])


# ------------------------------------------------------------------ the call

async def run_call(stack: Any, question: np.ndarray, barge_in_at: float | None, timeout_s: float = 120.0) -> dict[str, Any]:
    """One simulated call against a running stack; returns the demo's figures."""
    from .caller import RtcClient

    base = stack.page_url.split("?")[0].rstrip("/")
    # A browser's jitter buffer on a clean network holds ~40 ms; aiortc's default is 80 ms.
    caller = RtcClient(base, stack.token, keep_audio=True, jitter_target_ms=CALLER_JITTER_MS)
    try:
        await caller.connect()
        await caller.wait_open()
        sid = caller.session_id
        session = stack.bridge.sessions[sid]
        caller.mic.play(with_silence(question, SILENCE_BEFORE_S, SILENCE_AFTER_S), mark_voiced_end="user_end")
        await caller.wait_for(lambda: "user_end" in caller.mic.marks, timeout_s, "the question to be played")
        user_end = caller.mic.marks["user_end"]
        first = await caller.wait_for(lambda: next(iter(caller.audio_frames(user_end)), None), timeout_s,
                                      "the agent's first audio frame")
        first_audio_at = first[0]
        turn = session.agent_turn  # the question's turn: later turns must not mix into its figures
        result: dict[str, Any] = {"session_id": sid, "turn": turn}
        if barge_in_at is not None:
            await asyncio.sleep(max(0.0, first_audio_at + barge_in_at - time.time()))
            interrupt_at = time.time()
            caller.send({"type": "interrupt"})
            caller.mic.play(synthesize_16k(BARGE_IN_TEXT, "barge_in"))
            await asyncio.sleep(2.0)
            last = last_before_gap(caller.audio_frames(interrupt_at), interrupt_at)
            result["barge_in_silence_ms"] = round((last - interrupt_at) * 1000, 1)
            result["stale_frames"] = session.playout.stale_frames
            result["heard_text"] = session.times[turn].heard_text if turn in session.times else ""
        else:
            await caller.wait_for(
                lambda: any(m.get("turn") == turn and m.get("state") == "listening" for m in caller.controls("state"))
                and session.state.value == "listening", timeout_s, "the agent to finish its answer")
            await asyncio.sleep(0.3)
        t = session.times.get(turn)
        if t is None:
            raise RuntimeError("the agent never answered (no turn recorded)")
        finals = [m["text"] for m in caller.controls("transcript") if m.get("final") and m.get("turn") == t.turn]
        result.update({
            "user_transcript": finals[-1] if finals else t.user_text,
            "agent_text": t.agent_text or "".join(m.get("d", "") for _, m in caller.tokens if m.get("t") == t.turn).strip(),
            "voice_to_voice_ms": round((first_audio_at - user_end) * 1000, 1),
            "endpoint_ms": round(t.endpoint_ms, 1),
            "response_ms": round((first_audio_at - t.endpoint_ts) * 1000, 1),
            "asr_ms": round(t.asr_ms, 1),
            "llm_ttft_ms": round(t.llm_ttft_ms, 1),
            "tts_first_clause_ms": round(t.tts_first_clause_ms, 1),
            "tts_first_audio_ms": round(t.tts_first_audio_ms, 1),
            "bus_overhead_ms": round(t.bus_overhead_ms, 2),
            "hops_ms": {k: round(v, 2) for k, v in t.hops.items()},
            "bridge_to_caller_ms": round((first_audio_at - t.first_audio_ts) * 1000, 1) if t.first_audio_ts else None,
        })
        result["_audio"] = caller.received_pcm()
        return result
    finally:
        await caller.close()


def last_before_gap(frames: list[tuple[float, float]], since: float, gap_s: float = 0.3) -> float:
    """Arrival time of the last agent frame before the first silence of `gap_s` after `since`.

    After a barge-in the agent should go quiet; a later answer to the caller's
    new words (a new turn) starts after such a gap and does not count.
    """
    last = since
    for arrived, _ in frames:
        if arrived - last > gap_s:
            break
        last = arrived
    return last


WATERFALL = [
    ("endpoint_ms", "VAD silence wait before the turn ended"),
    ("asr_ms", "ASR job: read frames + transcribe"),
    ("llm_ttft_ms", "LLM job start -> first token"),
    ("tts_first_clause_ms", "TTS job start -> first clause of tokens ready"),
    ("tts_first_audio_ms", "first clause -> first audio chunk"),
    ("bus_overhead_ms", "Redis hops on the critical path (queue waits included)"),
    ("bridge_to_caller_ms", "bridge playout -> caller (WebRTC, jitter buffer)"),
    ("response_ms", "turn-end decision -> first agent audio at the caller"),
    ("voice_to_voice_ms", "caller's last voiced frame -> first agent audio"),
]


def print_table(result: dict[str, Any]) -> None:
    print(f"session   {result['session_id']}")
    print(f"caller    {result['user_transcript']}")
    print(f"agent     {result['agent_text']}")
    print()
    for key, what in WATERFALL:
        value = result.get(key)
        bar = "#" * int(min(60, (value or 0) / 20))
        print(f"{key:20} {value if value is not None else '-':>8} ms  {bar:<30} {what}")
    if "barge_in_silence_ms" in result:
        print(f"\nbarge-in: agent quiet {result['barge_in_silence_ms']} ms after the interrupt; "
              f"stale frames {result['stale_frames']}; heard: {result.get('heard_text', '')!r}")


# ------------------------------------------------------------------ CLI

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pools", help="pools TOML file (default: $VOXBUS_POOLS, else ops/pools/cpu.toml)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else an embedded Redis)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--input", help=f"WAV (or any audio file) the caller says (default: {DEFAULT_QUESTION!r}, synthesized)")
    p.add_argument("--barge-in-at", type=float, help="talk over the agent this many seconds into its answer")
    p.add_argument("--out", help="directory for reply.wav, transcript.txt and waterfall.json (default ./out/demo-SESSION)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verbose-workers", action="store_true", help="echo the workers' output")


async def _demo(args: argparse.Namespace) -> int:
    from .stack import StackError, local_stack

    question = read_audio_16k(args.input) if args.input else synthesize_16k(DEFAULT_QUESTION, "question")
    try:
        async with local_stack(args.pools, args.redis_url, port=0, verbose=args.verbose_workers) as stack:
            result = await run_call(stack, question, args.barge_in_at)
    except StackError as exc:
        print(f"voxbus demo: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"voxbus demo: {exc}", file=sys.stderr)
        return 3
    audio = result.pop("_audio")
    out = Path(args.out or f"out/demo-{result['session_id']}")
    out.mkdir(parents=True, exist_ok=True)
    write_wav(out / "reply.wav", audio, 48_000)
    (out / "transcript.txt").write_text(f"caller: {result['user_transcript']}\nagent: {result['agent_text']}\n")
    (out / "waterfall.json").write_text(json.dumps(result, indent=2))
    result["out_dir"] = str(out)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
        print(f"\nwrote {out}/reply.wav, transcript.txt, waterfall.json")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        return 130


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="bridge listen address")
    p.add_argument("--port", type=int, default=8080, help="bridge port (0: any free port)")
    p.add_argument("--token", help="bearer token for callers (default: $VOXBUS_BRIDGE_TOKEN, else random)")
    p.add_argument("--verbose-workers", action="store_true", help="echo the workers' output")


async def _up(args: argparse.Namespace) -> int:
    import signal

    from .stack import StackError, local_stack

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with local_stack(args.pools, args.redis_url, host=args.host, port=args.port, token=args.token,
                               verbose=args.verbose_workers) as stack:
            print(f"voxbus up: open {stack.page_url}  (Ctrl-C stops everything)", flush=True)
            await stop.wait()
    except StackError as exc:
        print(f"voxbus up: {exc}", file=sys.stderr)
        return 2
    return 0


def run_up(args: argparse.Namespace) -> int:
    return asyncio.run(_up(args))
