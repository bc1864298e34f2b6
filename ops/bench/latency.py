"""Latency budget: demo turns through the real voxbus stack, each stage against its budget, and a peer.

voxbus: one local stack (`bridge/stack.py`: Redis, embedded unless --redis-url, one worker per pool of
--pools, the bridge) is started once. Per run, the demo's simulated caller (`bridge/demo.py` run_call:
real WebRTC, Opus, a 40 ms jitter buffer) makes two calls, one clean and one with pink noise 15 dB below
the speech, each asking every question (Piper-synthesized, `bridge/demo_audio.py`) and waiting for the
whole spoken answer. Each question is one turn; its waterfall row (voice_to_voice_ms, endpoint_ms, ...
as `voxbus demo --json` reports them) counts. One untimed question warms the stack first.

The budget (target: voice-to-voice <= 800 ms on 2 CPU cores) is checked on the p50 of each stage. The
stages overlap (ASR, the LLM and TTS start at the caller's first 100 ms pause, a preemptive turn), so
they do not add up to response_ms or voice_to_voice_ms.

The peer, measured in the same run after the voxbus stack has stopped: pipecat 1.14 on the same models
and the same audio, once with its default turn handling and once ended by its VAD alone at 0.3 s
(`ops/bench/latency_peer.py` says how it is fed and timed). The ratio is peer p50 / voxbus p50 of
voice-to-voice; voxbus's figure includes the WebRTC hop to the caller and the peer's has no transport,
so the ratio against voxbus's voice-to-voice minus bridge_to_caller is printed too.

A GPU budget table for the reference pools (`ops/pools/reference-gpu.toml`) is filled from figures
measured on a GPU (`--gpu-figures FILE.json`: {"device": "...", "pools": {"POOL": {"p50_ms": X,
"p90_ms": Y} or X}}); without them every row says "not measured".

    .venv/bin/python ops/bench/latency.py --runs 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# As in every voxbus process (shared/cli.py): numpy's OpenBLAS threads would otherwise spin on the
# cores the stages need. Set before numpy loads, so the in-process peer runs under the same rule.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "ops" / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # run as a script: the project and latency_peer

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What should I cook for dinner tonight?",
]
WARMUP_QUESTION = "Hello, can you hear me?"
CONDITIONS: list[tuple[str, float | None]] = [("clean", None), ("noise15", 15.0)]
BUDGETS_MS: dict[str, float] = {  # stage -> budget (ms); the stages overlap, see the docstring
    "endpoint": 150, "asr": 120, "llm_ttft": 200, "tts_first_audio": 120, "bus": 20, "bridge_to_caller": 80,
    "response": 450, "voice_to_voice": 800,
}
STAGE_KEYS = {  # stage -> the waterfall field it is read from
    "endpoint": "endpoint_ms", "asr": "asr_ms", "llm_ttft": "llm_ttft_ms", "tts_first_audio": "tts_first_audio_ms",
    "bus": "bus_overhead_ms", "bridge_to_caller": "bridge_to_caller_ms", "response": "response_ms",
    "voice_to_voice": "voice_to_voice_ms",
}
FIGURE_KEYS = ["voice_to_voice_ms", "endpoint_ms", "response_ms", "asr_ms", "llm_ttft_ms", "tts_first_clause_ms",
               "tts_first_audio_ms", "bus_overhead_ms", "bridge_to_caller_ms", "v2v_minus_b2c_ms"]
PEER_KEYS = ["voice_to_voice_ms", "endpoint_ms", "response_ms", "asr_ms", "llm_ttft_ms", "tts_first_audio_ms"]
GPU_METRICS = {"asr": "asr", "llm": "llm_ttft", "tts": "tts_first_audio"}  # pool stage -> budget stage
DEFAULT_GPU_POOLS = ROOT / "ops" / "pools" / "reference-gpu.toml"


def stats(values: list[float | None]) -> dict[str, Any]:
    """p50 / p90 (linear interpolation) and the count of the numbers in `values`."""
    xs = [float(v) for v in values if isinstance(v, (int, float))]
    if not xs:
        return {"p50": None, "p90": None, "n": 0}
    return {"p50": round(float(np.percentile(xs, 50)), 1), "p90": round(float(np.percentile(xs, 90)), 1), "n": len(xs)}


def figures(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, Any]]:
    return {key: stats([row.get(key) for row in rows]) for key in keys}


# ------------------------------------------------------------------ voxbus


async def run_voxbus(args: argparse.Namespace, questions: list[np.ndarray], texts: list[str]) -> dict[str, Any]:
    """Start the stack once; per run one call per condition; every question's waterfall row."""
    from bridge.demo import run_call
    from bridge.demo_audio import synthesize_16k
    from bridge.stack import local_stack

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    t0 = time.monotonic()
    async with local_stack(args.pools, args.redis_url, port=0) as stack:
        started = time.monotonic() - t0
        if not args.no_warmup:
            (await run_call(stack, [synthesize_16k(WARMUP_QUESTION)], None, gap_s=args.gap)).pop("_audio", None)
        for run in range(args.runs):
            for condition, snr in CONDITIONS:
                try:
                    result = await run_call(stack, questions, None, noise_snr_db=snr, gap_s=args.gap)
                except (TimeoutError, RuntimeError) as exc:  # an unanswered question: counted, the rest goes on
                    failures.append(f"run {run} {condition}: {exc}")
                    continue
                result.pop("_audio", None)
                if result["turns_answered"] != len(questions):
                    failures.append(f"run {run} {condition}: {result['turns_answered']} turns for {len(questions)} "
                                    "questions")
                for row in result["turns"]:
                    b2c = row.get("bridge_to_caller_ms")
                    rows.append({"condition": condition, "run": run, "question_text": texts[row["question"] - 1],
                                 **{k: v for k, v in row.items() if k != "hops_ms"},
                                 "v2v_minus_b2c_ms": round(row["voice_to_voice_ms"] - b2c, 1) if b2c else None})
    return {"rows": rows, "failures": failures, "stack_start_s": round(started, 1),
            "elapsed_s": round(time.monotonic() - t0, 1), "load_avg_1m_end": round(os.getloadavg()[0], 2)}


def budget_rows(figs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for stage, budget in BUDGETS_MS.items():
        fig = figs[STAGE_KEYS[stage]]
        p50 = fig["p50"]
        rows.append({"stage": stage, "field": STAGE_KEYS[stage], "budget_ms": budget, "p50_ms": p50,
                     "p90_ms": fig["p90"],
                     "over_ms": round(p50 - budget, 1) if p50 is not None else None,
                     "status": "n/a" if p50 is None else ("over" if p50 > budget else "under")})
    return rows


# ------------------------------------------------------------------ peer


def run_peer(args: argparse.Namespace, questions: list[np.ndarray]) -> dict[str, Any]:
    """pipecat on the same models: one pipeline per peer row, the same plan of conditions x runs."""
    from shared.config import load_config
    from shared.models import resolve

    try:
        import latency_peer as lp
    except ImportError as exc:  # pipecat or one of its service dependencies is missing
        return {"error": f"pipecat cannot run here: {exc} (pip install -e '.[bench]')", "rows": [], "turns": []}
    t0 = time.monotonic()
    plan = [(cond, snr, run) for run in range(args.runs) for cond, snr in CONDITIONS]
    turns: list[dict[str, Any]] = []
    prompt = load_config(args.pools).bridge.system_prompt
    with lp.LlamaServer(str(resolve("bundled:smollm2-135m-instruct")), prompt) as llama:
        for name in lp.PEERS:
            turns += asyncio.run(lp.run_peer(name, questions, plan, llama=llama, warmup=not args.no_warmup,
                                             gap_s=args.gap))
    rows = []
    for name in lp.PEERS:
        mine = [t for t in turns if t["peer"] == name]
        rows.append({"peer": name, "description": lp.PEER_DESCRIPTIONS[name], "turns": len(mine),
                     "missed": sum(not t["answered"] for t in mine), **figures(mine, PEER_KEYS)})
    from importlib.metadata import version

    return {"error": None, "pipecat_version": version("pipecat-ai"), "rows": rows, "turns": turns,
            "elapsed_s": round(time.monotonic() - t0, 1), "load_avg_1m_end": round(os.getloadavg()[0], 2)}


def ratios(figs: dict[str, dict[str, Any]], peer: dict[str, Any]) -> dict[str, Any]:
    v2v, bare = figs["voice_to_voice_ms"]["p50"], figs["v2v_minus_b2c_ms"]["p50"]
    out: dict[str, Any] = {"voxbus_v2v_p50_ms": v2v, "voxbus_v2v_minus_b2c_p50_ms": bare, "peers": {}}
    for row in peer.get("rows", []):
        p50 = row["voice_to_voice_ms"]["p50"]
        out["peers"][row["peer"]] = {
            "peer_v2v_p50_ms": p50,
            "ratio": round(p50 / v2v, 2) if p50 and v2v else None,
            "ratio_vs_v2v_minus_b2c": round(p50 / bare, 2) if p50 and bare else None,
        }
    return out


# ------------------------------------------------------------------ GPU table


def gpu_table(pools_file: Path, figures_file: str | None) -> dict[str, Any]:
    """One row per GPU pool of the reference pools file; measured figures from `figures_file` or 'not measured'."""
    from shared.config import load_config

    measured: dict[str, Any] = {}
    device = None
    if figures_file:
        data = json.loads(Path(figures_file).read_text())
        device, measured = data.get("device"), data.get("pools", {})
    rows = []
    for pool in load_config(str(pools_file)).pools.values():
        stage = GPU_METRICS.get(pool.stage)
        if stage is None:
            continue
        fig = measured.get(pool.name)
        p50 = fig if isinstance(fig, (int, float)) else (fig or {}).get("p50_ms")
        p90 = None if isinstance(fig, (int, float)) else (fig or {}).get("p90_ms")
        rows.append({"pool": pool.name, "stage": pool.stage, "engine": pool.engine,
                     "model": str(pool.options.get("model", "")), "gpu_type": pool.gpu_type, "metric": stage,
                     "budget_ms": BUDGETS_MS[stage], "p50_ms": p50, "p90_ms": p90,
                     "status": "not measured" if p50 is None else ("over" if p50 > BUDGETS_MS[stage] else "under")})
    return {"pools_file": str(pools_file), "figures_file": figures_file, "device": device, "rows": rows}


# ------------------------------------------------------------------ report


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(r: dict[str, Any]) -> None:
    vb = r["voxbus"]
    print(f"voxbus latency budget: {r['turns']} turns ({len(r['questions'])} question(s) x {len(CONDITIONS)} "
          f"conditions x {r['runs']} run(s)), pools {r['pools']}, {r['machine']['cpus']} CPUs, "
          f"load average {r['machine']['load_avg_1m']} at the start")
    for failure in vb["failures"]:
        print(f"  ! {failure}")
    print(f"\n{'stage':<18}{'budget':>8}{'p50':>8}{'p90':>8}  over/under (ms)")
    for row in r["budget"]:
        over = "-" if row["over_ms"] is None else f"{row['status']} {row['over_ms']:+.0f}"
        print(f"{row['stage']:<18}{row['budget_ms']:>8.0f}{_ms(row['p50_ms']):>8}{_ms(row['p90_ms']):>8}  {over}")
    print("(stages overlap: ASR, LLM and TTS start at the first 100 ms pause, so they do not add up to response)")
    extra = r["figures"]
    print(f"tts_first_clause p50 {_ms(extra['tts_first_clause_ms']['p50'])} ms; voice-to-voice minus "
          f"bridge_to_caller p50 {_ms(extra['v2v_minus_b2c_ms']['p50'])} ms")
    for cond, figs in r["figures_by_condition"].items():
        print(f"  {cond:<8} v2v p50 {_ms(figs['voice_to_voice_ms']['p50'])} p90 {_ms(figs['voice_to_voice_ms']['p90'])}"
              f"  endpoint p50 {_ms(figs['endpoint_ms']['p50'])}  (n={figs['voice_to_voice_ms']['n']})")
    peer = r["peer"]
    if peer is None:
        print("\npeer: skipped (--no-peer)")
    elif peer["error"]:
        print(f"\npeer: {peer['error']}")
    else:
        print(f"\npeer: pipecat-ai {peer['pipecat_version']} on the same models, questions and conditions (p50 ms)")
        cols = ["voice_to_voice_ms", "endpoint_ms", "response_ms", "asr_ms", "llm_ttft_ms", "tts_first_audio_ms"]
        print(f"{'row':<18}{'n':>4}{'v2v':>7}{'v2v90':>7}{'endpt':>7}{'resp':>7}{'asr':>7}{'ttft':>7}{'tts':>7}")
        vrow = [("voxbus", r["turns"], r["figures"])] + [(p["peer"], p["turns"] - p["missed"], p) for p in peer["rows"]]
        for name, n, f in vrow:
            print(f"{name:<18}{n:>4}{_ms(f['voice_to_voice_ms']['p50']):>7}{_ms(f['voice_to_voice_ms']['p90']):>7}"
                  + "".join(f"{_ms(f[c]['p50']):>7}" for c in cols[1:]))
        for p in peer["rows"]:
            print(f"  {p['peer']}: {p['description']}" + (f"; {p['missed']} unanswered" if p["missed"] else ""))
        ratio = r["ratio"]
        for name, q in ratio["peers"].items():
            print(f"ratio {name} / voxbus (v2v p50): {q['ratio']}x; against voxbus v2v minus bridge_to_caller "
                  f"({_ms(ratio['voxbus_v2v_minus_b2c_p50_ms'])} ms): {q['ratio_vs_v2v_minus_b2c']}x")
    gpu = r["gpu"]
    print(f"\nGPU budget ({gpu['pools_file']}{', ' + gpu['device'] if gpu['device'] else ''})")
    print(f"{'pool':<16}{'stage':<6}{'gpu':<9}{'metric':<17}{'budget':>7}{'p50':>7}{'p90':>7}  status")
    for row in gpu["rows"]:
        print(f"{row['pool']:<16}{row['stage']:<6}{row['gpu_type']:<9}{row['metric']:<17}{row['budget_ms']:>7.0f}"
              f"{_ms(row['p50_ms']):>7}{_ms(row['p90_ms']):>7}  {row['status']}")
    print(f"\nelapsed {r['elapsed_s']} s (voxbus {vb['elapsed_s']} s, load average after it {vb['load_avg_1m_end']}"
          + (f"; peer {peer['elapsed_s']} s, after it {peer['load_avg_1m_end']})"
             if peer and not peer["error"] else ")"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.demo_audio import synthesize_16k

    t0 = time.monotonic()
    texts = QUESTIONS[: args.questions]
    questions = [synthesize_16k(text) for text in texts]
    load = round(os.getloadavg()[0], 2)
    vb = asyncio.run(run_voxbus(args, questions, texts))
    figs = figures(vb["rows"], FIGURE_KEYS)
    peer = None if args.no_peer else run_peer(args, questions)
    report: dict[str, Any] = {
        "runs": args.runs, "questions": texts, "conditions": [c for c, _ in CONDITIONS],
        "pools": args.pools or os.environ.get("VOXBUS_POOLS") or "ops/pools/cpu.toml",
        "turns": len(vb["rows"]), "budgets_ms": BUDGETS_MS, "figures": figs,
        "figures_by_condition": {c: figures([x for x in vb["rows"] if x["condition"] == c], FIGURE_KEYS)
                                 for c, _ in CONDITIONS},
        "budget": budget_rows(figs), "peer": peer, "ratio": ratios(figs, peer or {}),
        "gpu": gpu_table(Path(args.gpu_pools), args.gpu_figures), "voxbus": vb,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": load},
    }
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2, help="calls per condition (clean, noise 15 dB)")
    p.add_argument("--questions", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1),
                   help="questions per call")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between an answer and the next question")
    p.add_argument("--no-peer", action="store_true", help="skip the pipecat peer")
    p.add_argument("--no-warmup", action="store_true", help="no untimed warm-up question (voxbus and peer)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--pools", help="pools TOML file (default: $VOXBUS_POOLS, else ops/pools/cpu.toml)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else an embedded Redis)")
    p.add_argument("--gpu-pools", default=str(DEFAULT_GPU_POOLS), help="pools file of the GPU budget table")
    p.add_argument("--gpu-figures", help="JSON of figures measured on a GPU for the GPU budget table")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 1 if not report["turns"] or (report["peer"] and report["peer"]["error"]) else 0


if __name__ == "__main__":
    sys.exit(main())
