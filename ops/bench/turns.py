"""Turn-taking benchmark: how well the bridge decides that the caller finished speaking.

In the spirit of LiveKit's eot-bench. Every file of a labelled corpus (see
ops/bench/turn_corpus.py; built once into the cache) is played through the
bridge's real ingest path in simulated time: 20 ms frames into `BatchVad.feed`
(Silero, the product's EndpointConfig from `bridge.core.endpoint_config`), its
events mapped to the turn machine exactly as `bridge.session` does, a `Tick`
every frame. Frame n is "now" = (n + 1) * 20 ms, when its last sample was
captured. A `ScoreTurn` runs the real Smart Turn v3.2 model on what the
session would send (500 ms before the utterance up to the newest frame, at
most 8 s); its verdict reaches the machine at now + the measured inference
time, at the first frame tick at or after that time. Redis and the worker
queue are not simulated.

Definitions, per file (true end = `turn_end_s` of its label):
- false cut-off: the machine decided a turn end (a `turn_end` record)
  before the true end; the rate is the share of files with one;
- delay: time of the first turn end at or after the true end, minus the true
  end; a file without one is *missed* and counts the rest of the file;
- monologue turns: turn ends decided in the monologue files (ideal: one each).

Configurations: VAD only (eot="none") with 300, 500 and 800 ms of silence
(BridgeConfig min_silence_ms 270 / 470 / 770: the VAD decides up to one 32 ms
window later), and the end-of-turn model at the default setting (the [bridge]
table of ops/pools/cpu.toml) plus any `--threshold`. Also measured: the cost
of one Smart Turn decision (batch of 1) and per item in a batch of 8.
The measured time varies from run to run, and with it which verdicts beat the
caller's next word: `--cost-ms` fixes the delay for comparable runs.

    .venv/bin/python ops/bench/turns.py [--corpus DIR] [--limit N] [--threshold 0.3 ...]
        [--model threshold=0.5,min_endpoint=300,rescore=200 ...] [--cost-ms MS] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script

from ops.bench.turn_corpus import Item, ensure_corpus, load_corpus  # noqa: E402
from shared.protocol import FRAME_SAMPLES, SAMPLE_RATE, SpeechEnd, SpeechPause, SpeechStart  # noqa: E402

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
VAD_ONLY_MS = {300: 270, 500: 470, 800: 770}  # label -> BridgeConfig.min_silence_ms
EOT_MODEL = ("smart-turn", {"model": "bundled:smart-turn-v3.2", "threads": 1})


@dataclass(frozen=True)
class Setup:
    label: str
    bridge: Any  # shared.config.BridgeConfig


@dataclass
class FileResult:
    item: Item
    ends: list[tuple[float, str]]  # (decision time s, "vad" | "model")

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
    def delay_s(self) -> float:
        after = self.first_after
        return after[0] - self.true_end if after else len(self.item.audio) / SAMPLE_RATE - self.true_end


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
            clip = audio[start * FRAME_SAMPLES : (end + 1) * FRAME_SAMPLES].astype(np.float32) / 32768.0
            t0 = time.perf_counter()
            prob = float(self.engine.predict([clip])[0])
            cost = time.perf_counter() - t0
            self.costs_s.append(cost)
            self.clips.append(clip)
            self._seen[key] = (prob, cost if self.fixed_cost_s is None else self.fixed_cost_s)
        return self._seen[key]


MODEL_KNOBS = {"threshold": "eot_threshold", "min_endpoint": "min_endpoint_ms", "max_endpoint": "max_endpoint_ms",
               "rescore": "eot_rescore_ms", "pause": "preemptive_pause_ms"}


def parse_model(spec: str) -> dict[str, Any]:
    """`threshold=0.3,min_endpoint=300,rescore=200` -> BridgeConfig overrides."""
    out: dict[str, Any] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in MODEL_KNOBS or not value:
            raise SystemExit(f"--model: expected {'|'.join(MODEL_KNOBS)}=VALUE[,...], got {part!r}")
        out[MODEL_KNOBS[key]] = float(value) if key == "threshold" else int(float(value))
    return out


def setups(thresholds: list[float], models: list[str] | None = None) -> list[Setup]:
    from shared.config import load_config

    base = load_config().bridge
    out = [Setup(f"vad-{label}", msgspec.structs.replace(base, eot="none", min_silence_ms=ms))
           for label, ms in VAD_ONLY_MS.items()]
    model = msgspec.structs.replace(base, eot="model")
    out.append(Setup(f"model@{model.eot_threshold:g} (default)", model))
    for th in dict.fromkeys(thresholds):
        if th != model.eot_threshold:
            out.append(Setup(f"model@{th:g}", msgspec.structs.replace(model, eot_threshold=th)))
    for spec in models or []:
        out.append(Setup(f"model[{spec}]", msgspec.structs.replace(model, **parse_model(spec))))
    return out


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


def simulate(item: Item, events: dict[int, list[Any]], turn_config: Any, scorer: Scorer) -> FileResult:
    """Replay one file's VAD events through a fresh TurnMachine, as bridge.session drives it."""
    from bridge import turn_events as ev
    from bridge.session import EOT_PRE_SPEECH_FRAMES, EOT_WINDOW_FRAMES
    from bridge.turns import TurnMachine

    machine = TurnMachine(turn_config)
    pending: list[ev.EotVerdict] = []
    ends: list[tuple[float, str]] = []
    n_frames = -(-len(item.audio) // FRAME_SAMPLES)

    def handle(event: Any, seq: int) -> None:
        for cmd in machine.handle(event):
            if isinstance(cmd, ev.ScoreTurn):
                end = max(cmd.end_frame, seq)  # the newest frame: the model hears the silence too
                start = max(cmd.start_frame - EOT_PRE_SPEECH_FRAMES, end - EOT_WINDOW_FRAMES + 1, 0)
                prob, cost = scorer.score(item.name, item.audio, start, end)
                pending.append(ev.EotVerdict(event.now + cost, cmd.turn, prob))
            elif isinstance(cmd, ev.Record) and cmd.kind == "turn_end":
                ends.append((event.now, cmd.data["by"]))

    for seq in range(n_frames):
        now = (seq + 1) * FRAME_S
        due = sorted((v for v in pending if v.now <= now + 1e-9), key=lambda v: v.now)
        pending[:] = [v for v in pending if v.now > now + 1e-9]
        for verdict in due:  # they arrived between the last tick and this one
            handle(verdict, seq)
        for e in events.get(seq, ()):
            if isinstance(e, SpeechStart):
                handle(ev.VadStart(now, e.frame), seq)
            elif isinstance(e, SpeechPause):
                handle(ev.VadResume(now) if e.resumed else ev.VadPause(now, e.start_frame, e.end_frame), seq)
            elif isinstance(e, SpeechEnd):
                handle(ev.VadEnd(now, e.start_frame, e.end_frame, e.silence_ms), seq)
        handle(ev.Tick(now), seq)
    return FileResult(item, ends)


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
    return {
        "config": setup.label,
        "eot": setup.bridge.eot,
        "threshold": setup.bridge.eot_threshold if setup.bridge.eot != "none" else None,
        "min_silence_ms": setup.bridge.min_silence_ms if setup.bridge.eot == "none" else None,
        "max_endpoint_ms": setup.bridge.max_endpoint_ms if setup.bridge.eot != "none" else None,
        "files": len(results),
        "false_cutoff_pct": _pct(sum(bool(r.early) for r in results), len(results)),
        "false_cutoff_pct_by_kind": {k: _pct(sum(bool(r.early) for r in rs), len(rs))
                                     for k, rs in sorted(by_kind.items())},
        "cutoffs_by_pause_s": {g: {"cut": c, "pauses": n}
                               for g, (c, n) in sorted(pauses.items(), key=lambda x: float(x[0]))},
        "mean_delay_complete_ms": _ms(complete),
        "p90_delay_complete_ms": _ms(complete, 90),
        "mean_delay_all_ms": _ms([r.delay_s for r in results]),
        "missed": sum(r.first_after is None for r in results),
        "ended_by_model_pct": _pct(sum(by == "model" for _, by in decided), len(decided)),
        "monologue_files": len(monologues),
        "monologue_turns": sum(len(r.ends) for r in monologues),
    }


def decision_costs(scorer: Scorer, repeats: int = 5) -> dict[str, Any]:
    """Batch-of-1 costs measured during the run, and a batch of 8 of the same clips timed apart."""
    if not scorer.clips:
        scorer.score("warm-up", np.zeros(SAMPLE_RATE * 2, np.int16), 0, 99)
    batch = [scorer.clips[i % len(scorer.clips)] for i in range(8)]
    per_item = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer.engine.predict(batch)
        per_item.append((time.perf_counter() - t0) / len(batch))
    ones = scorer.costs_s
    return {"decision_cost_ms": {"mean": _ms(ones), "p90": _ms(ones, 90), "calls": len(ones)},
            "decision_cost_batch8_ms": {"mean": _ms(per_item), "p90": _ms(per_item, 90), "repeats": repeats}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import bridge.vad
    import workers.eot
    from bridge.core import endpoint_config
    from bridge.session import turn_config

    t0 = time.perf_counter()
    corpus = args.corpus or ensure_corpus(log=lambda m: print(m, file=sys.stderr))
    items = load_corpus(Path(corpus))[: args.limit or None]
    vad_engine = bridge.vad.create("silero", {})
    eot = workers.eot.create(*EOT_MODEL)
    eot.load()
    eot.predict([np.zeros(SAMPLE_RATE, np.float32)])  # the first call pays for allocations
    scorer = Scorer(eot, None if args.cost_ms is None else args.cost_ms / 1000)
    cases = setups(args.threshold, args.model)
    vad_cache: dict[tuple[str, Any], dict[int, list[Any]]] = {}
    rows = []
    for setup in cases:
        ecfg, tcfg = endpoint_config(setup.bridge), turn_config(setup.bridge)
        results = []
        for item in items:
            key = (item.name, ecfg)  # the VAD does not depend on the turn machine: run once per setting
            if key not in vad_cache:
                vad_cache[key] = vad_events(vad_engine, ecfg, item.audio)
            results.append(simulate(item, vad_cache[key], tcfg, scorer))
        rows.append(summarize(setup, results))
    kinds = [it.label["kind"] for it in items]
    return {
        "corpus": str(corpus),
        "files": len(items),
        "files_by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
        "audio_s": round(sum(len(it.audio) for it in items) / SAMPLE_RATE, 1),
        "verdict_delay": "measured" if args.cost_ms is None else f"{args.cost_ms:g} ms",
        "configs": rows,
        **decision_costs(scorer),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def print_table(report: dict[str, Any]) -> None:
    kinds = ", ".join(f"{n} {k}" for k, n in report["files_by_kind"].items())
    print(f"corpus: {report['corpus']} ({report['files']} files: {kinds}; {report['audio_s']} s of audio)\n")
    head = ["config", "cut-off %", "delay ms", "p90 ms", "delay all", "missed", "mono turns", "cut compl %",
            "cut incompl %"]
    lines = []
    for row in report["configs"]:
        split = row["false_cutoff_pct_by_kind"]
        lines.append([row["config"], row["false_cutoff_pct"], row["mean_delay_complete_ms"],
                      row["p90_delay_complete_ms"], row["mean_delay_all_ms"], row["missed"],
                      f"{row['monologue_turns']}/{row['monologue_files']}", split.get("complete"),
                      split.get("incomplete")])
    widths = [max(len(_fmt(x)) for x in col) for col in zip(head, *lines)]
    for line in [head, *lines]:
        print("  ".join(_fmt(x).rjust(w) if i else _fmt(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths))))
    print("\ndelay ms / p90 ms: over complete utterances; delay all: over every file; "
          "mono turns: turn ends / monologues")
    print("incomplete utterances cut off, by internal pause (s): cut/pauses")
    for row in report["configs"]:
        gaps = "  ".join(f"{g}: {v['cut']}/{v['pauses']}" for g, v in row["cutoffs_by_pause_s"].items())
        print(f"  {row['config']:<24} {gaps or '-'}")
    one, eight = report["decision_cost_ms"], report["decision_cost_batch8_ms"]
    print(f"\nSmart Turn decision: {one['mean']} ms mean, {one['p90']} ms p90 (batch of 1, {one['calls']} calls); "
          f"batch of 8: {eight['mean']} ms per item")
    print(f"verdicts delivered after: {report['verdict_delay']}; run: {report['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=None, help="labelled corpus directory (default: the built-in one)")
    p.add_argument("--limit", type=int, default=0, help="only the first N files")
    p.add_argument("--threshold", type=float, action="append", default=[], help="add a model row at this threshold")
    p.add_argument("--model", action="append", default=[], metavar="KNOB=V,...",
                   help="add a model row with these settings (threshold, min_endpoint, max_endpoint, rescore, pause)")
    p.add_argument("--cost-ms", type=float, default=None,
                   help="deliver each verdict this long after its request instead of after the measured inference "
                        "time (reproducible figures: the measured time varies from run to run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
