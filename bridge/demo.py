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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .caller import RtcClient
    from .session import CallSession

from .demo_audio import noise_for, read_audio_16k, synthesize_16k, with_silence, write_wav

log = logging.getLogger("voxbus.demo")

DEFAULT_QUESTION = "What is the capital of France?"
BARGE_IN_TEXT = "Wait, stop please."
SILENCE_BEFORE_S = 0.5
GAP_S = 1.0  # the caller's pause between hearing an answer and asking the next question
CALLER_JITTER_MS = 40


# ------------------------------------------------------------------ the call


def _played(caller: RtcClient, mark: str) -> bool:
    return mark in caller.mic.marks


def _first_frame(caller: RtcClient, since: float) -> Any:
    return next(iter(caller.audio_frames(since)), None)


def _answered(caller: RtcClient, session: CallSession, turn: int) -> bool:
    """The page was told this turn is over and the bridge is listening again."""
    return any(m.get("turn") == turn and m.get("state") == "listening" for m in caller.controls("state")) \
        and session.state.value == "listening"


async def run_call(stack: Any, questions: list[np.ndarray], barge_in_at: float | None, *,
                   noise_snr_db: float | None = None, gap_s: float = GAP_S, timeout_s: float = 120.0) -> dict[str, Any]:
    """One simulated call against a running stack, one question after another; returns the demo's figures.

    Each question waits for the whole spoken answer before the next; with `barge_in_at` the caller
    talks over the last answer that many seconds into it. The result holds one row per question
    (`turns`) and, at the top level, the first question's row (what a one-question demo prints).
    """
    from .caller import RATE, RtcClient

    base = stack.page_url.split("?")[0].rstrip("/")
    # A browser's jitter buffer on a clean network holds ~40 ms; aiortc's default is 80 ms.
    caller = RtcClient(base, stack.token, keep_audio=True, jitter_target_ms=CALLER_JITTER_MS)
    try:
        await caller.connect()
        await caller.wait_open()
        sid = caller.session_id
        session = stack.bridge.sessions[sid]
        if noise_snr_db is not None:
            caller.mic.set_noise(noise_for(noise_snr_db, questions, RATE))
        rows: list[dict[str, Any]] = []
        for i, question in enumerate(questions):
            last = i == len(questions) - 1
            mark = f"user_end_{i}"
            caller.mic.play(with_silence(question, SILENCE_BEFORE_S if i == 0 else 0.0, 0.0), mark_voiced_end=mark)
            await caller.wait_for(partial(_played, caller, mark), timeout_s, f"question {i + 1} to be played")
            user_end = caller.mic.marks[mark]
            first = await caller.wait_for(partial(_first_frame, caller, user_end), timeout_s,
                                          f"the agent's first audio frame after question {i + 1}")
            turn = session.agent_turn  # this question's turn: later turns must not mix into its figures
            row: dict[str, Any] = {"question": i + 1, "turn": turn}
            if last and barge_in_at is not None:
                row.update(await _barge_in(caller, session, first[0] + barge_in_at, turn))
            else:
                await caller.wait_for(partial(_answered, caller, session, turn), timeout_s, f"the agent to finish answer {i + 1}")
                await asyncio.sleep(0.3 if last else gap_s)
            row.update(_figures(caller, session, turn, user_end, first[0]))
            row.update(_seam_figures(caller, session, stack.config, turn, first))
            rows.append(row)
        answered = sorted({t for t, times in session.times.items() if times.first_audio_ts})
        result: dict[str, Any] = {"session_id": sid, **rows[0], "turns": rows, "turns_answered": len(answered),
                                  "noise_snr_db": noise_snr_db}
        result["_audio"] = caller.received_pcm()
        return result
    finally:
        await caller.aclose()


async def _barge_in(caller: Any, session: Any, at: float, turn: int) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, at - time.time()))
    interrupt_at = time.time()
    caller.send({"type": "interrupt"})
    caller.mic.play(synthesize_16k(BARGE_IN_TEXT, "barge_in"))
    await asyncio.sleep(2.0)
    last = last_before_gap(caller.audio_frames(interrupt_at), interrupt_at)
    return {"barge_in_silence_ms": round((last - interrupt_at) * 1000, 1), "stale_frames": session.playout.stale_frames,
            "heard_text": session.times[turn].heard_text if turn in session.times else ""}


def _figures(caller: Any, session: Any, turn: int, user_end: float, first_audio_at: float) -> dict[str, Any]:
    t = session.times.get(turn)
    if t is None:
        raise RuntimeError("the agent never answered (no turn recorded)")
    finals = [m["text"] for m in caller.controls("transcript") if m.get("final") and m.get("turn") == t.turn]
    return {
        "user_transcript": finals[-1] if finals else t.user_text,
        "agent_text": t.agent_text or "".join(m.get("d", "") for _, m in caller.tokens if m.get("t") == t.turn).strip(),
        "voice_to_voice_ms": round((first_audio_at - user_end) * 1000, 1),
        "endpoint_ms": round(t.endpoint_ms, 1),
        "endpoint_by": t.endpoint_by,
        "eot_prob": t.eot_prob,
        "response_ms": round((first_audio_at - t.endpoint_ts) * 1000, 1),
        "asr_ms": round(t.asr_ms, 1),
        "llm_ttft_ms": round(t.llm_ttft_ms, 1),
        "tts_first_clause_ms": round(t.tts_first_clause_ms, 1),
        "tts_first_audio_ms": round(t.tts_first_audio_ms, 1),
        "bus_overhead_ms": round(t.bus_overhead_ms, 2),
        "hops_ms": {k: round(v, 2) for k, v in t.hops.items()},
        "bridge_to_caller_ms": round((first_audio_at - t.first_audio_ts) * 1000, 1) if t.first_audio_ts else None,
    }


def _seam_figures(caller: Any, session: Any, config: Any, turn: int, first: tuple[float, float]) -> dict[str, Any]:
    """The joins between the reply's TTS pieces as the caller heard them (bridge/seam_check.py)."""
    from workers.tts.seams import PieceShaper

    from .seam_check import check_turn, summary

    stats = session.playout.turn_stats(turn)
    audio = session.playout.turns.get(turn)
    if stats is None or audio is None or not caller.pcm:
        return {}
    if turn in session.times:
        session.times[turn].set_playout(stats)
    sizes = np.cumsum([0] + [len(p) for p in caller.pcm])
    arrived = caller.audio.index(first)  # the reply's first frame with sound; it may start quiet a frame before
    search_from = int(sizes[max(0, arrived - 2)])
    c = config.default_pool("tts").chunks
    shaper = PieceShaper(48_000, edge_ms=c.edge_ms, fade_ms=c.fade_ms, clause_pause_ms=c.clause_pause_ms,
                         sentence_pause_ms=c.sentence_pause_ms)
    pauses = [shaper.pause_ms(text) for text in audio.clauses[:-1]]
    end = search_from + (sum(stats.clause_frames) + sum(u.frames for u in stats.underruns) + 4) * 960
    seams = check_turn(caller.received_pcm(), 48_000, search_from, stats.onset, stats.clause_starts,
                       stats.underruns, pauses, end)
    return {"playout_gap_ms": stats.gap_ms, "playout_gaps": stats.gaps, "playout_gap_total_ms": stats.gap_total_ms,
            "clause_frames": stats.clause_frames, **summary(seams)}


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
    ("endpoint_ms", "silence waited before the turn's end was decided (VAD timeout or end-of-turn model)"),
    ("asr_ms", "ASR job: read frames + transcribe"),
    ("llm_ttft_ms", "LLM job start -> first token"),
    ("tts_first_clause_ms", "TTS job start -> first words of the reply ready to speak"),
    ("tts_first_audio_ms", "first words -> first audio chunk"),
    ("bus_overhead_ms", "Redis hops on the critical path (queue waits included)"),
    ("bridge_to_caller_ms", "bridge playout -> caller (WebRTC, jitter buffer)"),
    ("response_ms", "turn-end decision -> first agent audio at the caller"),
    ("voice_to_voice_ms", "caller's last voiced sound (clean input) -> first agent audio"),
]
_COLUMNS = [("voice_to_voice_ms", "v2v"), ("endpoint_ms", "endpt"), ("response_ms", "resp"), ("asr_ms", "asr"),
            ("llm_ttft_ms", "ttft"), ("tts_first_clause_ms", "words"), ("tts_first_audio_ms", "tts"),
            ("bus_overhead_ms", "bus"), ("bridge_to_caller_ms", "b2c")]


def print_table(result: dict[str, Any]) -> None:
    print(f"session   {result['session_id']}" + (f"   (pink noise at {result['noise_snr_db']} dB SNR)"
                                                 if result.get("noise_snr_db") is not None else ""))
    rows = result["turns"]
    if len(rows) == 1:
        print(f"caller    {result['user_transcript']}")
        print(f"agent     {result['agent_text']}")
        print()
        for key, what in WATERFALL:
            value = result.get(key)
            bar = "#" * int(min(60, (value or 0) / 20))
            print(f"{key:20} {value if value is not None else '-':>8} ms  {bar:<30} {what}")
    else:
        for row in rows:
            print(f"\n{row['question']}. caller  {row['user_transcript']}\n   agent   {row['agent_text']}")
        print("\n" + "  ".join(["turn", "by   "] + [f"{name:>6}" for _, name in _COLUMNS]) + "   (ms)")
        for row in rows:
            cells = [f"{row[key] if row.get(key) is not None else '-':>6}" for key, _ in _COLUMNS]
            print("  ".join([f"{row['turn']:>4}", f"{row.get('endpoint_by') or '-':5}"] + cells))
        print(f"\n{result['turns_answered']} turn(s) answered for {len(rows)} question(s)")
    for row in rows:
        if row.get("joins"):
            print(f"\nseams (turn {row['turn']}): {row['joins']} join(s), silence {row['join_silence_ms']} ms, "
                  f"largest gap {row['join_gap_ms']} ms ({row['join_seam_gap_ms']} ms besides underruns), "
                  f"click {row['join_click']}, playout underruns {row['playout_gaps']} "
                  f"(longest {row['playout_gap_ms']} ms): {'ok' if row['seams_ok'] else 'AUDIBLE'}")
    if "barge_in_silence_ms" in rows[-1]:
        last = rows[-1]
        print(f"\nbarge-in: agent quiet {last['barge_in_silence_ms']} ms after the interrupt; "
              f"stale frames {last['stale_frames']}; heard: {last.get('heard_text', '')!r}")


# ------------------------------------------------------------------ CLI

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pools", help="pools TOML file (default: $VOXBUS_POOLS, else ops/pools/cpu.toml)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else an embedded Redis)")
    p.add_argument("--only", help="comma-separated pools to start (default: every pool of the pools file)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--input", action="append", default=[],
                   help=f"an audio file the caller says (any format PyAV decodes); repeat for a conversation, one "
                        f"turn each (default: {DEFAULT_QUESTION!r}, synthesized)")
    p.add_argument("--say", action="append", default=[],
                   help="words the caller says, synthesized with the bundled voice; repeat for more turns "
                        "(after any --input)")
    p.add_argument("--noise", type=float, metavar="SNR_DB",
                   help="mix pink noise into the caller's microphone this many dB below the speech")
    p.add_argument("--gap", type=float, default=GAP_S, help="seconds the caller waits between an answer and the next question")
    p.add_argument("--barge-in-at", type=float, help="talk over the last answer this many seconds into it")
    p.add_argument("--out", help="directory for reply.wav, transcript.txt and waterfall.json (default ./out/demo-SESSION)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verbose-workers", action="store_true", help="echo the workers' output")


async def _demo(args: argparse.Namespace) -> int:
    from .stack import StackError, local_stack

    questions = [read_audio_16k(path) for path in args.input] + [synthesize_16k(text) for text in args.say]
    if not questions:
        questions = [synthesize_16k(DEFAULT_QUESTION, "question")]
    only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
    try:
        async with local_stack(args.pools, args.redis_url, port=0, verbose=args.verbose_workers, only=only) as stack:
            result = await run_call(stack, questions, args.barge_in_at, noise_snr_db=args.noise, gap_s=args.gap)
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
    (out / "transcript.txt").write_text("".join(f"caller: {row['user_transcript']}\nagent: {row['agent_text']}\n"
                                                for row in result["turns"]))
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
        only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
        async with local_stack(args.pools, args.redis_url, host=args.host, port=args.port, token=args.token,
                               verbose=args.verbose_workers, only=only) as stack:
            print(f"voxbus up: open {stack.page_url}  (Ctrl-C stops everything)", flush=True)
            failed = asyncio.ensure_future(stack.bridge.tasks.failed.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            failed.cancel()
            stopped.cancel()
            if stack.bridge.tasks.failure:
                print(f"voxbus up: the bridge stopped: {stack.bridge.tasks.failure}", file=sys.stderr)
                return 70
    except StackError as exc:
        print(f"voxbus up: {exc}", file=sys.stderr)
        return 2
    return 0


def run_up(args: argparse.Namespace) -> int:
    return asyncio.run(_up(args))
