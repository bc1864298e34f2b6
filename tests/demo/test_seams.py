"""No audible seam between TTS pieces in what the caller heard: `voxbus demo` with Piper and with Kokoro.

The reply is spoken piece by piece (its first words, then clause by clause), so
it has joins. `voxbus demo --json` measures each one in reply.wav
(bridge/seam_check.py): the silence there beyond the pause the text asks for
(over 30 ms fails) and the steepest step next to it (a click fails).

A gap has two causes. The join itself (engine padding left in, a piece's end
held back): that always fails. An underrun, the next piece not synthesized by
the time the one before it has played: the playout counts those. Piper runs
~10x faster than real time on two cores, so an underrun there means the
machine was busy: the call is run once more, and fails if it happens again.
The bundled Kokoro (int8, CPU) runs at about real time on two cores, slower
when they are shared, so its underruns are reported as an expected failure of
capacity, never hidden as a pass; its joins must still be clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.seam_check import MAX_CLICK, MAX_GAP_MS
from tests.demo.test_demo import ROOT, parse, run_demo

KOKORO_MODEL = "bundled:kokoro-82m-int8"


def seams_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [seam for row in result["turns"] for seam in row.get("seams", [])]


def assert_clean_joins(result: dict[str, Any]) -> None:
    """The joins themselves: no click, no silence beyond the pause and any underrun."""
    seams = seams_of(result)
    assert seams, f"the reply was spoken in one piece, no join to check: {result['agent_text']!r}"
    for seam in seams:
        assert seam["click"] <= MAX_CLICK, (seam, result["agent_text"])
        assert seam["seam_gap_ms"] <= MAX_GAP_MS, (seam, result["agent_text"])
    for row in result["turns"]:
        for key in ("join_gap_ms", "join_click", "playout_gap_ms", "playout_gaps", "clause_frames"):
            assert key in row, (key, row)
        assert len(row["clause_frames"]) == row["joins"] + 1


def gaps(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [seam for seam in seams_of(result) if seam["gap_ms"] > MAX_GAP_MS]


def test_piper_reply_has_no_gap_and_no_click(tmp_path: Path) -> None:
    for attempt in (1, 2):
        result = parse(run_demo("--json", "--say", "What can I see in Paris?", "--out", str(tmp_path / str(attempt))))
        assert_clean_joins(result)
        if not gaps(result):
            break
    assert not gaps(result), (f"underruns in two calls in a row (longest {result['playout_gap_ms']} ms): "
                              f"{gaps(result)}; reply {result['agent_text']!r}")
    assert result["seams_ok"] and result["playout_gap_ms"] <= MAX_GAP_MS, result


def test_kokoro_reply_has_no_click_and_no_gap_at_its_joins(tmp_path: Path) -> None:
    pools = (ROOT / "ops/pools/cpu.toml").read_text()
    piper = ('engine = "piper"', 'options = { model = "bundled:piper-joe-medium" }')
    assert all(line in pools for line in piper)
    kokoro = tmp_path / "kokoro.toml"
    kokoro.write_text(pools.replace(piper[0], 'engine = "kokoro"').replace(piper[1], f'options = {{ model = "{KOKORO_MODEL}" }}'))
    result = parse(run_demo("--json", "--pools", str(kokoro), "--out", str(tmp_path / "out"), timeout=420))
    assert_clean_joins(result)
    late = gaps(result)
    if late:
        assert all(seam["underrun_ms"] >= seam["gap_ms"] - MAX_GAP_MS for seam in late), late
        pytest.xfail(f"Kokoro was slower than real time on this CPU: {len(late)} join(s) waited for synthesis "
                     f"(longest {result['playout_gap_ms']} ms); the joins themselves are clean")
