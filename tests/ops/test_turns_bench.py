"""ops/bench/turns.py runs on a tiny labelled corpus and prints every figure of every configuration.

Like tests/ops/test_bench_runs.py: the benchmark runs as a user runs it (a
subprocess with `--json`, the real Silero VAD, Smart Turn model and the
asr-cpu pool's Whisper for the preemptive transcripts), and only its contract
is checked, never its figures. The corpus is three synthesized
files in the `--corpus` format (one with a 1 s pause mid-sentence), so no
download is needed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def corpus_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("turn_corpus", ROOT / "ops" / "bench" / "turn_corpus.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_turns_bench(tmp_path: Path) -> None:
    tc = corpus_module()
    specs = [("complete-piper.wav", ["What is the capital of Germany?"], [], "piper", "complete"),
             ("incomplete-piper.wav", ["I would like to book a table for", "four people at seven."], [1.0], "piper",
              "incomplete"),
             ("complete-espeak.wav", ["Thanks, that was helpful."], [], "en+m3", "complete")]
    items = [tc.Item(name, *tc.utterance(pieces, gaps, voice, kind)) for name, pieces, gaps, voice, kind in specs]
    tc.write_corpus(tmp_path, items)
    assert [it.name for it in tc.load_corpus(tmp_path)] == [s[0] for s in specs]

    trace = tmp_path / "trace.jsonl"
    cmd = [sys.executable, str(ROOT / "ops" / "bench" / "turns.py"), "--json", "--corpus", str(tmp_path),
           "--threshold", "0.3", "--threshold", "0.7", "--asr-cost-ms", "150", "--trace", str(trace),
           "--model", "fast=0.95,min_endpoint=400,per_s=100,lang=none,unpunct=1,cues=whereas+in case"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"turns.py exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    r = json.loads(proc.stdout)

    assert r["files"] == 3 and r["files_by_kind"] == {"complete": 2, "incomplete": 1}
    labels = [row["config"] for row in r["configs"]]
    assert labels[:5] == ["vad-300", "vad-500", "vad-800", "model (old default)", "model (default)"]
    assert {"model@0.3", "model@0.7"} <= set(labels)
    old, default, knobs = r["configs"][3], r["configs"][4], r["configs"][-1]
    assert (old["language"], old["fast_threshold"], old["min_endpoint_ms"]) == ("none", 1.0, 0)
    assert default["language"] == "en"
    assert (knobs["fast_threshold"], knobs["min_endpoint_ms"], knobs["language"]) == (0.95, 400, "none")
    for row in r["configs"]:
        assert isinstance(row["setting"], str) and row["setting"]
        for key in ("false_cutoff_pct", "mean_delay_complete_ms", "p90_delay_complete_ms", "mean_delay_all_ms",
                    "mean_ready_complete_ms"):
            assert number(row[key]) and row[key] >= 0, (row["config"], key, row[key])
        assert set(row["false_cutoff_pct_by_kind"]) == {"complete", "incomplete"}
        assert all(number(v) for v in row["false_cutoff_pct_by_kind"].values())
        assert row["missed"] in range(4) and row["monologue_files"] == 0 and row["monologue_turns"] == 0
        assert sum(v["pauses"] for v in row["cutoffs_by_pause_s"].values()) == 1  # the one 1 s pause
    model_rows = [row for row in r["configs"] if row["eot"] == "model"]
    assert len(model_rows) == 5 and all(number(row["threshold"]) for row in model_rows)
    assert r["decision_cost_ms"]["calls"] >= 1 and r["asr_cost_ms"]["calls"] >= 1
    assert r["transcript_delay"] == "150 ms" and number(r["cue_check_us"])
    for key in ("decision_cost_ms", "decision_cost_batch8_ms", "asr_cost_ms"):
        assert number(r[key]["mean"]) and r[key]["mean"] > 0 and number(r[key]["p90"]), r[key]
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 3 * len(labels) and {line["config"] for line in lines} == set(labels)
    default_trace = [e for line in lines if line["config"] == "model (default)" for e in line["trace"]]
    assert any("transcript" in e for e in default_trace) and any("eot" in e for e in default_trace)
