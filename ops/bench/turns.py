"""Turn-taking benchmark: how well the bridge decides that the caller finished speaking.

In the spirit of LiveKit's eot-bench. Every file of a labelled corpus (see
ops/bench/turn_corpus.py; built once into the cache) is played through the
bridge's real ingest path in simulated time (ops/bench/turns_sim.py): Silero
VAD with the product's EndpointConfig, the turn machine driven as
`bridge.session` drives it, the real Smart Turn v3.2 for its `ScoreTurn`s and
the asr-cpu pool's Whisper (tiny.en, int8, beam 1) for its preemptive
`SubmitAsr`s, each result delivered after its measured cost (or a fixed one).
Redis and the bus hops are not simulated.

Definitions, per file (true end = `turn_end_s` of its label):
- false cut-off: the machine decided a turn end (a `turn_end` record)
  before the true end; the rate is the share of files with one;
- delay: time of the first turn end at or after the true end, minus the true
  end; a file without one is *missed* and counts the rest of the file;
- ready: the same end, or its transcript's arrival if later: when the reply
  can start (the LLM needs the words whatever decided the end);
- monologue turns: turn ends decided in each monologue file (ideal: one each).

Configurations: VAD only (eot="none") with 300, 500 and 800 ms of silence
(BridgeConfig min_silence_ms 270 / 470 / 770: the VAD decides up to one 32 ms
window later); the end-of-turn model as it was before the words joined it
("old default": the audio model alone, p >= 0.5 ends the turn at once); the
default setting (the [bridge] table of ops/pools/cpu.toml); any `--threshold`
and `--model` rows. Also measured: the cost of one decision (Smart Turn, batch
of 1, and per item in a batch of 8; the continuation-cue check) and of the
preemptive transcript it reads. Measured costs vary from run to run on a
shared machine, and with them which verdicts beat the caller's next word:
`--cost-ms` and `--asr-cost-ms` fix them for comparable runs. `--trace FILE`
writes what the machine heard and decided, file by file.

    .venv/bin/python ops/bench/turns.py [--corpus DIR] [--limit N] [--threshold 0.3 ...]
        [--model threshold=0.5,fast=0.9,min_endpoint=300,per_s=150,lang=en,unpunct=0 ...]
        [--cost-ms MS] [--asr-cost-ms MS] [--trace FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))  # run as a script: bridge/, shared/, tests.engines.speech and the siblings

from procstats import emit
from turn_corpus import ensure_corpus, load_corpus
from turns_sim import FileResult, Scorer, Transcriber, load_models, simulate, vad_events

from shared.protocol import SAMPLE_RATE

VAD_ONLY_MS = {300: 270, 500: 470, 800: 770}  # label -> BridgeConfig.min_silence_ms
# The end-of-turn rule before the transcript joined it: the audio model alone, "complete" at >= 0.5 ends at once.
OLD_DEFAULT = {"eot_threshold": 0.5, "min_endpoint_ms": 0, "max_endpoint_ms": 2500, "eot_rescore_ms": 200,
               "eot_fast_threshold": 1.0, "eot_language": "none", "eot_unpunctuated": False, "min_endpoint_per_s": 0}


@dataclass(frozen=True)
class Setup:
    label: str
    bridge: Any  # shared.config.BridgeConfig


MODEL_KNOBS = {"threshold": "eot_threshold", "fast": "eot_fast_threshold", "min_endpoint": "min_endpoint_ms",
               "max_endpoint": "max_endpoint_ms", "rescore": "eot_rescore_ms", "pause": "preemptive_pause_ms",
               "lang": "eot_language", "cues": "eot_extra_cues", "unpunct": "eot_unpunctuated",
               "per_s": "min_endpoint_per_s"}


def parse_model(spec: str) -> dict[str, Any]:
    """`threshold=0.3,fast=0.9,min_endpoint=300,lang=none,cues=whereas+in case` -> BridgeConfig overrides."""
    out: dict[str, Any] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in MODEL_KNOBS or not value:
            raise SystemExit(f"--model: expected {'|'.join(MODEL_KNOBS)}=VALUE[,...], got {part!r}")
        if key in ("threshold", "fast"):
            out[MODEL_KNOBS[key]] = float(value)
        elif key == "unpunct":
            out[MODEL_KNOBS[key]] = value.lower() in ("1", "true", "yes", "on")
        elif key == "lang":
            out[MODEL_KNOBS[key]] = value
        elif key == "cues":
            out[MODEL_KNOBS[key]] = [c for c in value.split("+") if c.strip()]
        else:
            out[MODEL_KNOBS[key]] = int(float(value))
    return out


def describe(b: Any) -> str:
    """A model setting in a few characters: threshold, fast path, min endpoint, transcript cues."""
    if b.eot == "none":
        return f"silence {b.min_silence_ms} ms"
    fast = "off" if b.eot_fast_threshold >= 1.0 else f"{b.eot_fast_threshold:g}"
    words = "audio only" if b.eot_language == "none" else f"+words {b.eot_language}"
    extra = f" max {b.max_endpoint_ms}" if b.max_endpoint_ms != 2500 else ""
    per_s = f"+{b.min_endpoint_per_s}/s" if b.min_endpoint_per_s else ""
    punct = "+unp" if b.eot_unpunctuated and b.eot_language != "none" else ""
    return f"p>={b.eot_threshold:g} fast {fast} min {b.min_endpoint_ms}{per_s}{extra} {words}{punct}"


def setups(thresholds: list[float], models: list[str] | None = None) -> list[Setup]:
    from shared.config import load_config

    base = load_config().bridge
    out = [Setup(f"vad-{label}", msgspec.structs.replace(base, eot="none", min_silence_ms=ms))
           for label, ms in VAD_ONLY_MS.items()]
    model = msgspec.structs.replace(base, eot="model")
    out.append(Setup("model (old default)", msgspec.structs.replace(model, **OLD_DEFAULT)))
    out.append(Setup("model (default)", model))
    for th in dict.fromkeys(thresholds):
        if th != model.eot_threshold:
            out.append(Setup(f"model@{th:g}", msgspec.structs.replace(
                model, eot_threshold=th, eot_fast_threshold=max(th, model.eot_fast_threshold))))
    for spec in models or []:
        out.append(Setup(f"model[{spec}]", msgspec.structs.replace(model, **parse_model(spec))))
    return out


def _ms(values: list[float], q: float | None = None) -> float | None:
    if not values:
        return None
    return round(1000 * (statistics.fmean(values) if q is None else float(np.percentile(values, q))), 1)


def _pct(k: int, n: int) -> float | None:
    return round(100 * k / n, 1) if n else None


def summarize(setup: Setup, results: list[FileResult]) -> dict[str, Any]:
    by_kind: dict[str, list[FileResult]] = {}
    for r in results:
        by_kind.setdefault(r.item.label["kind"], []).append(r)
    complete = [r.delay_s for r in by_kind.get("complete", [])]
    pauses: dict[str, list[int]] = {}  # gap -> [cut, count], incomplete files' internal pauses
    for r in by_kind.get("incomplete", []):
        spans = r.item.label.get("pauses_s") or []
        for i, (start, end) in enumerate(spans):
            nxt = spans[i + 1][0] if i + 1 < len(spans) else r.true_end
            cut = any(start <= t < nxt for t in r.early)  # decided in the pause or before the next one
            entry = pauses.setdefault(f"{end - start:.1f}", [0, 0])
            entry[0], entry[1] = entry[0] + cut, entry[1] + 1
    monologues = by_kind.get("monologue", [])
    decided = [a for r in results if (a := r.first_after)]
    b = setup.bridge
    model = b.eot != "none"
    return {
        "config": setup.label,
        "setting": describe(b),
        "eot": b.eot,
        "threshold": b.eot_threshold if model else None,
        "fast_threshold": b.eot_fast_threshold if model else None,
        "min_endpoint_ms": b.min_endpoint_ms if model else None,
        "language": b.eot_language if model else None,
        "min_silence_ms": b.min_silence_ms if not model else None,
        "max_endpoint_ms": b.max_endpoint_ms if model else None,
        "files": len(results),
        "false_cutoff_pct": _pct(sum(bool(r.early) for r in results), len(results)),
        "false_cutoff_pct_by_kind": {k: _pct(sum(bool(r.early) for r in rs), len(rs))
                                     for k, rs in sorted(by_kind.items())},
        "cut_files": [r.item.name for r in results if r.early],
        "cutoffs_by_pause_s": {g: {"cut": c, "pauses": n}
                               for g, (c, n) in sorted(pauses.items(), key=lambda x: float(x[0]))},
        "mean_delay_complete_ms": _ms(complete),
        "p90_delay_complete_ms": _ms(complete, 90),
        "mean_delay_all_ms": _ms([r.delay_s for r in results]),
        "mean_ready_complete_ms": _ms([d for r in by_kind.get("complete", []) if (d := r.ready_delay_s) is not None]),
        "missed": sum(r.first_after is None for r in results),
        "ended_by_model_pct": _pct(sum(by == "model" for _, by in decided), len(decided)),
        "monologue_files": len(monologues),
        "monologue_turns": sum(len(r.ends) for r in monologues),
        "monologue_turns_by_file": {r.item.name: len(r.ends) for r in monologues},
    }


def decision_costs(scorer: Scorer, asr: Transcriber, repeats: int = 5) -> dict[str, Any]:
    """What one end-of-turn decision costs: Smart Turn (batch of 1 as run, and per item in a batch of 8
    of the same clips, timed apart), the continuation-cue check, and the preemptive ASR it reads."""
    from bridge.turn_text import continuation_cue, cues_for

    if not scorer.clips:
        scorer.score("warm-up", np.zeros(SAMPLE_RATE * 2, np.int16), 0, 99)
    batch = [scorer.clips[i % len(scorer.clips)] for i in range(8)]
    per_item = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer.engine.predict(batch)
        per_item.append((time.perf_counter() - t0) / len(batch))
    texts = asr.texts or ["I would like to book a table for"]
    cues = cues_for("en")
    t0 = time.perf_counter()
    for _ in range(repeats * 20):
        for text in texts:
            continuation_cue(text, cues)
    cue_us = (time.perf_counter() - t0) / (repeats * 20 * len(texts)) * 1e6
    ones = scorer.costs_s
    return {"decision_cost_ms": {"mean": _ms(ones), "p90": _ms(ones, 90), "calls": len(ones)},
            "decision_cost_batch8_ms": {"mean": _ms(per_item), "p90": _ms(per_item, 90), "repeats": repeats},
            "cue_check_us": round(cue_us, 1),
            "asr_cost_ms": {"mean": _ms(asr.costs_s), "p90": _ms(asr.costs_s, 90), "calls": len(asr.costs_s)}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.core import endpoint_config
    from bridge.turn_state import TurnConfig

    t0 = time.perf_counter()
    corpus = args.corpus or ensure_corpus(log=lambda m: print(m, file=sys.stderr))
    items = load_corpus(Path(corpus))[: args.limit or None]
    fixed = [None if ms is None else ms / 1000 for ms in (args.asr_cost_ms, args.cost_ms)]
    vad_engine, scorer, asr = load_models(*fixed)
    cases = setups(args.threshold, args.model)
    vad_cache: dict[tuple[str, Any], dict[int, list[Any]]] = {}
    rows = []
    traces: list[dict[str, Any]] = []
    for setup in cases:
        ecfg, tcfg = endpoint_config(setup.bridge), TurnConfig.from_bridge(setup.bridge)
        results = []
        for item in items:
            key = (item.name, ecfg)  # the VAD does not depend on the turn machine: run once per setting
            if key not in vad_cache:
                vad_cache[key] = vad_events(vad_engine, ecfg, item.audio)
            r = simulate(item, vad_cache[key], tcfg, scorer, asr)
            results.append(r)
            traces.append({"config": setup.label, "file": item.name, "true_end_s": r.true_end, "trace": r.trace})
        rows.append(summarize(setup, results))
    if args.trace:
        args.trace.write_text("".join(json.dumps(t) + "\n" for t in traces), encoding="utf-8")
    kinds = [it.label["kind"] for it in items]
    return {
        "corpus": str(corpus),
        "files": len(items),
        "files_by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
        "audio_s": round(sum(len(it.audio) for it in items) / SAMPLE_RATE, 1),
        "verdict_delay": "measured" if args.cost_ms is None else f"{args.cost_ms:g} ms",
        "transcript_delay": "measured" if args.asr_cost_ms is None else f"{args.asr_cost_ms:g} ms",
        "configs": rows,
        **decision_costs(scorer, asr),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def print_table(report: dict[str, Any]) -> None:
    kinds = ", ".join(f"{n} {k}" for k, n in report["files_by_kind"].items())
    print(f"corpus: {report['corpus']} ({report['files']} files: {kinds}; {report['audio_s']} s of audio)\n")
    head = ["config", "setting", "cut-off %", "delay ms", "p90 ms", "ready ms", "delay all", "missed", "mono turns",
            "cut compl %", "cut incompl %"]
    lines = []
    for row in report["configs"]:
        split = row["false_cutoff_pct_by_kind"]
        mono = "+".join(str(n) for n in row["monologue_turns_by_file"].values()) or "-"
        lines.append([row["config"], row["setting"], row["false_cutoff_pct"], row["mean_delay_complete_ms"],
                      row["p90_delay_complete_ms"], row["mean_ready_complete_ms"], row["mean_delay_all_ms"],
                      row["missed"], mono,
                      split.get("complete"), split.get("incomplete")])
    widths = [max(len(_fmt(x)) for x in col) for col in zip(head, *lines)]
    for line in [head, *lines]:
        print("  ".join(_fmt(x).rjust(w) if i > 1 else _fmt(x).ljust(w)
                        for i, (x, w) in enumerate(zip(line, widths))))
    print("\ndelay ms / p90 ms: true end -> end of turn, over complete utterances; ready ms: true end -> end of "
          "turn and its transcript in (when the reply can start), mean; delay all: over every file; "
          "mono turns: turn ends in each monologue (ideal: 1 each)")
    print("incomplete utterances cut off, by internal pause (s): cut/pauses")
    for row in report["configs"]:
        gaps = "  ".join(f"{g}: {v['cut']}/{v['pauses']}" for g, v in row["cutoffs_by_pause_s"].items())
        print(f"  {row['config']:<24} {gaps or '-'}")
    one, eight, asr = report["decision_cost_ms"], report["decision_cost_batch8_ms"], report["asr_cost_ms"]
    print(f"\none decision: Smart Turn {one['mean']} ms mean, {one['p90']} ms p90 (batch of 1, {one['calls']} calls; "
          f"batch of 8: {eight['mean']} ms per item) + continuation cues {report['cue_check_us']} us; "
          f"it reads the preemptive transcript (ASR {asr['mean']} ms mean, {asr['p90']} ms p90, {asr['calls']} calls), "
          "which the reply needs anyway")
    print(f"verdicts delivered after: {report['verdict_delay']}; transcripts after: {report['transcript_delay']}; "
          f"run: {report['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=None, help="labelled corpus directory (default: the built-in one)")
    p.add_argument("--limit", type=int, default=0, help="only the first N files")
    p.add_argument("--threshold", type=float, action="append", default=[], help="add a model row at this threshold")
    p.add_argument("--model", action="append", default=[], metavar="KNOB=V,...",
                   help=f"add a model row with these settings ({', '.join(MODEL_KNOBS)}; "
                        "lang=none: the audio model alone; cues=WORD+WORD: extra continuation cues)")
    p.add_argument("--cost-ms", type=float, default=None,
                   help="deliver each verdict this long after its request instead of after the measured inference "
                        "time (reproducible figures: the measured time varies from run to run)")
    p.add_argument("--asr-cost-ms", type=float, default=None,
                   help="deliver each preemptive transcript this long after its job starts instead of after the "
                        "measured transcription time")
    p.add_argument("--trace", type=Path, default=None,
                   help="write every file's verdicts, cues, transcripts and turn ends here (JSON lines)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    emit(run(args), args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
