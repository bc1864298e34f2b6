"""`voxbus inspect`, the figures: each turn's latency waterfall and the session's totals.

The waterfall keeps the names bridge/waterfall.py gives the live one (endpoint_ms,
asr_ms, llm_ttft_ms, tts_first_clause_ms, tts_first_audio_ms, response_ms,
voice_to_voice_ms), measured the same way at the bridge, from the recorded
marks; the bus hops the recording cannot show (the bridge's receive times) are
left out.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..protocol import FRAME_MS, EotDecision, Transcript, TurnMark
from .inspect_model import Playout, Rel, Timeline

FRAME_S = FRAME_MS / 1000
WATERFALL_KEYS = ("endpoint_ms", "asr_ms", "llm_ttft_ms", "tts_first_clause_ms", "tts_first_audio_ms", "response_ms",
                  "voice_to_voice_ms")


def waterfall(turn: int, events: list[Any], rel: Rel, playouts: dict[int, Playout]) -> dict[str, Any]:
    """The turn's latency waterfall, under the names bridge/waterfall.py gives them."""
    w: dict[str, Any] = {"turn": turn}
    hops: dict[str, float] = {}
    endpoint_ts = None
    for m in events:
        if getattr(m, "turn", None) != turn:
            continue
        if isinstance(m, TurnMark):
            if m.stage == "turn" and m.mark in ("end_vad", "end_model"):
                w["endpoint_ms"], w["endpoint_by"], endpoint_ts = round(m.value_ms, 1), m.mark[4:], rel(m.ts)
            key = {("llm", "ttft"): "llm_ttft_ms", ("tts", "first_audio"): "tts_first_audio_ms",
                   ("tts", "first_clause"): "tts_first_clause_ms"}.get((m.stage, m.mark))
            if key:
                w[key] = round(m.value_ms, 1)
            if (m.stage, m.mark) in (("asr", "queue_wait"), ("llm", "queue_wait"), ("tts", "token_hop")):
                hops[f"{m.stage}_{m.mark}"] = round(m.value_ms, 2)
        elif isinstance(m, EotDecision):
            w["eot_prob"] = round(m.prob, 4)
        elif isinstance(m, Transcript) and m.final:
            w["asr_ms"] = round(m.asr_ms, 1)
            w["speech_end_ts"] = round((m.end_seq + 1) * FRAME_S, 3)
    play = playouts.get(turn)
    if endpoint_ts is not None:
        w["endpoint_ts"] = round(endpoint_ts, 3)
    if play is not None:
        w["first_audio_ts"] = round(play.start, 3)
        if endpoint_ts is not None:
            w["response_ms"] = round((play.start - endpoint_ts) * 1000, 1)
        if "speech_end_ts" in w:
            w["voice_to_voice_ms"] = round((play.start - w["speech_end_ts"]) * 1000, 1)
        if play.heard_ms is not None:
            w["heard_ms"] = round(play.heard_ms, 1)
    w["hops"] = hops
    return w


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1), "n": len(values)}


def totals(tl: Timeline) -> dict[str, Any]:
    """The session's totals: counts, and the waterfall's median and maximum over the turns."""
    kinds: dict[str, int] = {}
    for m in tl.markers:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    outcomes: dict[str, int] = {}
    for j in tl.jobs:
        outcomes[j.outcome] = outcomes.get(j.outcome, 0) + 1
    heard_s = sum((p.heard_ms or 0.0) / 1000 for p in tl.playouts.values())
    return {
        "duration_s": round(tl.duration, 1),
        "turns": len(tl.rows),
        "answered": sum(r.status in ("answered", "interrupted") for r in tl.rows),
        "caller_speech_s": round(sum(s.t1 - s.t0 for s in tl.speech), 1),
        "agent_heard_s": round(heard_s, 1),
        "markers": kinds,
        "jobs": len(tl.jobs),
        "job_outcomes": outcomes,
        "pools": sorted({f"{j.pool} ({j.gpu_type})" for j in tl.jobs}),
        "workers": len({j.worker for j in tl.jobs}),
        "waterfall": {k: s for k in WATERFALL_KEYS if (s := _stats([r.waterfall[k] for r in tl.rows if k in r.waterfall]))},
    }
