"""What goes into the turn machine (events) and what comes out (commands): plain frozen dataclasses.

Events carry the time they happened (`now`, wall-clock seconds) so the machine
never reads a clock; commands are applied by `bridge.session.CallSession`.
See `bridge.turns` for the rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class VadStart:
    now: float
    frame: int


@dataclass(frozen=True, slots=True)
class VadPause:
    """`pause_ms` of silence inside an utterance: [start_frame, end_frame] is its voiced part so far."""

    now: float
    start_frame: int
    end_frame: int


@dataclass(frozen=True, slots=True)
class VadResume:
    """The caller spoke again after a VadPause (same utterance for the VAD)."""

    now: float


@dataclass(frozen=True, slots=True)
class VadEnd:
    now: float
    start_frame: int
    end_frame: int
    silence_ms: float


@dataclass(frozen=True, slots=True)
class EotVerdict:
    """The end-of-turn model's probability that turn `turn` (the utterance up to its pause) is complete."""

    now: float
    turn: int
    prob: float


@dataclass(frozen=True, slots=True)
class TranscriptIn:
    now: float
    turn: int
    text: str
    final: bool = True


@dataclass(frozen=True, slots=True)
class TokenIn:
    now: float
    turn: int
    seq: int
    text: str
    final: bool = False


@dataclass(frozen=True, slots=True)
class AudioQueued:
    """Agent audio of `turn` entered the playout queue (`final`: its last chunk)."""

    now: float
    turn: int
    final: bool = False


@dataclass(frozen=True, slots=True)
class FramePlayed:
    """A frame of `turn` left for the caller: the first of the turn, the last, or one between."""

    now: float
    turn: int
    first: bool = False
    last: bool = False


@dataclass(frozen=True, slots=True)
class ClientInterrupt:
    now: float


@dataclass(frozen=True, slots=True)
class JobFailedIn:
    now: float
    turn: int
    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class JobCancelledIn:
    now: float
    turn: int
    stage: str


@dataclass(frozen=True, slots=True)
class JobBusy:
    """A job of `turn` was dropped for being late (overload), or could not be queued."""

    now: float
    turn: int
    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


Event = (VadStart | VadPause | VadResume | VadEnd | EotVerdict | TranscriptIn | TokenIn | AudioQueued | FramePlayed
         | ClientInterrupt | JobFailedIn | JobCancelledIn | JobBusy | Tick)

# ------------------------------------------------------------------ commands


class Phase(enum.StrEnum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    AGENT_SPEAKING = "agent_speaking"


@dataclass(frozen=True, slots=True)
class SetPhase:
    phase: Phase
    turn: int


@dataclass(frozen=True, slots=True)
class SubmitAsr:
    turn: int
    start_frame: int
    end_frame: int


@dataclass(frozen=True, slots=True)
class StartReply:
    """Append the user's words to the context, then queue the LLM and TTS jobs of `turn`."""

    turn: int
    text: str


@dataclass(frozen=True, slots=True)
class Say:
    """Speak `text` as the agent's turn `turn` (no LLM: an apology when the pools are overloaded)."""

    turn: int
    text: str


@dataclass(frozen=True, slots=True)
class ScoreTurn:
    """Ask the end-of-turn model about the utterance [start_frame, end_frame] (turn `turn`)."""

    turn: int
    start_frame: int
    end_frame: int


@dataclass(frozen=True, slots=True)
class CancelTurn:
    turn: int
    reason: str


@dataclass(frozen=True, slots=True)
class RemoveUserText:
    """Drop the user message of `turn` from the context (an abandoned or merged turn)."""

    turn: int


@dataclass(frozen=True, slots=True)
class AppendAgentText:
    """The assistant's finished reply of `turn` goes into the context."""

    turn: int
    text: str


@dataclass(frozen=True, slots=True)
class CommitHeard:
    """The assistant turn in the context becomes what the caller heard of `turn` (the playout knows)."""

    turn: int


PlayoutOp = Literal["hold", "release", "flush", "pause", "resume"]


@dataclass(frozen=True, slots=True)
class Playout:
    op: PlayoutOp
    turn: int = -1  # hold: frames of this turn and later wait; flush: this turn and older are dropped


@dataclass(frozen=True, slots=True)
class SendTokens:
    turn: int
    seq: int
    text: str
    final: bool


@dataclass(frozen=True, slots=True)
class Control:
    msg: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Record:
    """Something the recording (the session's events stream) and the metrics should show.

    kind: "interrupt" (source), "false_interruption", "turn_end" (by, silence_ms,
    end_frame), "eot" (prob, complete), "eot_cue" (cue: the preemptive transcript ends on a
    continuation cue, so the model's "complete" cannot end the turn), "preemptive" (outcome),
    "merged" (into).
    """

    kind: str
    turn: int
    data: dict[str, Any] = field(default_factory=dict)


Command = (SetPhase | SubmitAsr | StartReply | Say | ScoreTurn | CancelTurn | RemoveUserText | AppendAgentText | CommitHeard
           | Playout | SendTokens | Control | Record)
