"""The latency waterfall of one turn: when each step of it happened, as the bridge saw it.

Measurement only: `CallSession` fills a `TurnTimes` as the turn's events and
marks arrive, sends it to the caller (`turn_metrics`) and `voxbus demo`
prints it. No decision reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .playout import PlayoutStats


@dataclass
class TurnTimes:
    """Per-turn marks (wall-clock seconds, or ms where the name says so)."""

    turn: int
    speech_end_ts: float = 0.0  # capture time of the last voiced frame
    endpoint_ts: float = 0.0  # when the turn's end was decided
    endpoint_ms: float = 0.0  # silence waited before that decision
    endpoint_by: str = ""  # "vad" (silence timeout) or "model" (end-of-turn model)
    eot_prob: float | None = None  # the end-of-turn model's last verdict on the turn
    transcript_ts: float = 0.0
    asr_ms: float = 0.0
    llm_ttft_ms: float = 0.0
    tts_first_audio_ms: float = 0.0
    first_audio_ts: float = 0.0  # first agent frame handed to the transport
    user_text: str = ""
    agent_text: str = ""
    heard_text: str = ""
    interrupted: bool = False
    overflow: list[str] = field(default_factory=list)
    tts_first_clause_ms: float = 0.0  # TTS job start -> first clause of tokens ready
    hops: dict[str, float] = field(default_factory=dict)  # Redis hops on the critical path, ms
    tokens: list[str] = field(default_factory=list)  # the reply's token texts as they came
    playout_gap_ms: float = 0.0  # longest underrun while the reply played (silence between its first and last frame)
    playout_gaps: int = 0  # underruns
    playout_gap_total_ms: float = 0.0
    clause_frames: list[int] = field(default_factory=list)  # frames played per TTS piece

    def set_playout(self, stats: PlayoutStats | None) -> None:
        """How the reply played out (`Playout.turn_stats`), once its last frame went."""
        if stats is not None:
            self.playout_gap_ms, self.playout_gaps = stats.gap_ms, stats.gaps
            self.playout_gap_total_ms, self.clause_frames = stats.gap_total_ms, list(stats.clause_frames)

    def apply_mark(self, stage: str, mark: str, value_ms: float) -> None:
        """A worker's `TurnMark` of this turn."""
        if stage == "llm" and mark == "ttft":
            self.llm_ttft_ms = value_ms
        elif stage == "tts" and mark == "first_audio":
            self.tts_first_audio_ms = value_ms
        elif stage == "tts" and mark == "first_clause":
            self.tts_first_clause_ms = value_ms
        elif mark in ("queue_wait", "token_hop") and stage in ("asr", "llm", "tts"):
            if mark == "token_hop" or stage != "tts":  # the TTS job waits for tokens off the critical path
                self.hops[f"{stage}_{mark}"] = value_ms

    @property
    def bus_overhead_ms(self) -> float:
        return sum(self.hops.values())

    @property
    def response_ms(self) -> float | None:
        if self.first_audio_ts and self.endpoint_ts:
            return (self.first_audio_ts - self.endpoint_ts) * 1000
        return None

    def waterfall(self) -> dict[str, Any]:
        resp = self.response_ms
        return {
            "turn": self.turn, "endpoint_ms": round(self.endpoint_ms, 1), "endpoint_by": self.endpoint_by,
            "eot_prob": self.eot_prob, "asr_ms": round(self.asr_ms, 1),
            "llm_ttft_ms": round(self.llm_ttft_ms, 1), "tts_first_audio_ms": round(self.tts_first_audio_ms, 1),
            "response_ms": round(resp, 1) if resp is not None else None,
            "speech_end_ts": self.speech_end_ts, "endpoint_ts": self.endpoint_ts, "first_audio_ts": self.first_audio_ts,
            "tts_first_clause_ms": round(self.tts_first_clause_ms, 1), "bus_overhead_ms": round(self.bus_overhead_ms, 2),
            "hops": {k: round(v, 2) for k, v in self.hops.items()},
            "user_text": self.user_text, "agent_text": self.agent_text, "heard_text": self.heard_text,
            "interrupted": self.interrupted, "playout_gap_ms": self.playout_gap_ms, "playout_gaps": self.playout_gaps,
            "playout_gap_total_ms": self.playout_gap_total_ms, "clause_frames": list(self.clause_frames),
        }
