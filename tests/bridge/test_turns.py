"""The turn machine (bridge/turns.py), event by event: pure, no Redis, no clock, no models.

Each scenario is a list of steps: an event, then what the commands it returned
must contain (`want`) and must not (`deny`), as short command descriptions
(see `describe`). Times are seconds from the start of the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge import turn_events as ev
from bridge.turn_text import LANGUAGES, continuation_cue, cues_for
from bridge.turns import TurnConfig, TurnMachine


def describe(cmd: ev.Command) -> str:
    """A command as a short string: 'asr 0 10-60', 'reply 0 Hello', 'cancel 0', 'flush 0', 'phase thinking'."""
    match cmd:
        case ev.SubmitAsr(turn, start, end):
            return f"asr {turn} {start}-{end}"
        case ev.StartReply(turn, text):
            return f"reply {turn} {text}"
        case ev.Say(turn, text):
            return f"say {turn} {text}"
        case ev.ScoreTurn(turn, start, end):
            return f"score {turn} {start}-{end}"
        case ev.CancelTurn(turn, _):
            return f"cancel {turn}"
        case ev.RemoveUserText(turn):
            return f"unsay {turn}"
        case ev.AppendAgentText(turn, text):
            return f"agent {turn} {text}"
        case ev.CommitHeard(turn):
            return f"heard {turn}"
        case ev.Playout(op, turn):
            return f"{op} {turn}" if op in ("hold", "flush") else op
        case ev.SendTokens(turn, seq, text, _):
            return f"tokens {turn}.{seq} {text}"
        case ev.SetPhase(phase, _):
            return f"phase {phase.value}"
        case ev.Control(msg):
            return f"control {msg['type']}"
        case ev.Record(kind, turn, data):
            extra = data.get("by") or data.get("outcome") or data.get("source") or ""
            return f"record {kind} {turn} {extra}".rstrip()
    raise AssertionError(f"unknown command {cmd!r}")


@dataclass
class Step:
    event: Any
    want: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    exact: bool = False  # `want` is the whole output, in order


def run(steps: list[Step], config: TurnConfig | None = None) -> TurnMachine:
    machine = TurnMachine(config)
    for i, step in enumerate(steps):
        got = [describe(c) for c in machine.handle(step.event)]
        where = f"step {i} ({step.event!r}) gave {got}"
        if step.exact:
            assert got == step.want, where
        for item in step.want:
            assert item in got, f"{where}: {item!r} missing"
        for item in step.deny:
            assert not any(g == item or g.startswith(item + " ") for g in got), f"{where}: {item!r} unexpected"
    return machine


# Building blocks: a caller utterance over frames 10..60, its transcript, the reply's tokens and audio.
def said(t: float, start: int = 10, end: int = 60, silence_ms: float = 300.0) -> list[Step]:
    return [Step(ev.VadStart(t, start), ["phase user_speaking"]), Step(ev.VadEnd(t + 1.3, start, end, silence_ms))]


def reply_played(t: float, turn: int, words: tuple[str, ...] = ("Paris", " it is.")) -> list[Step]:
    steps = [Step(ev.TokenIn(t, turn, i, w), [f"tokens {turn}.{i} {w}"]) for i, w in enumerate(words)]
    steps.append(Step(ev.TokenIn(t, turn, len(words), "", final=True)))
    steps.append(Step(ev.AudioQueued(t + 0.1, turn)))
    steps.append(Step(ev.FramePlayed(t + 0.2, turn, first=True), ["phase agent_speaking"]))
    return steps


NORMAL_TURN = [
    *said(0.0),
    Step(ev.VadEnd(1.3, 10, 60, 300.0), deny=["asr"]),  # a repeated end changes nothing
]

SCENARIOS: dict[str, list[Step]] = {
    "normal turn": [
        Step(ev.VadStart(0.0, 10), ["phase user_speaking"], exact=True),
        Step(ev.VadEnd(1.3, 10, 60, 300.0), ["asr 0 10-60", "record turn_end 0 vad", "phase thinking"]),
        Step(ev.TranscriptIn(1.5, 0, "What is the capital of France?"),
             ["control transcript", "reply 0 What is the capital of France?"]),
        *reply_played(1.8, 0),
        Step(ev.FramePlayed(3.0, 0, last=True), ["agent 0 Paris it is.", "phase listening"]),
    ],
    "preemptive turn confirmed": [
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.1, 10, 60), ["hold 0", "asr 0 10-60", "record preemptive 0 started"], deny=["phase"]),
        Step(ev.TranscriptIn(1.3, 0, "Hello there"), ["reply 0 Hello there"], deny=["control transcript"]),
        Step(ev.TokenIn(1.4, 0, 0, "Hi"), deny=["tokens"]),  # held until the turn is confirmed
        Step(ev.VadEnd(1.3, 10, 60, 300.0),
             ["release", "record preemptive 0 confirmed", "control transcript", "tokens 0.0 Hi", "phase thinking"],
             deny=["asr", "reply"]),
    ],
    "preemptive turn abandoned": [
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.1, 10, 60), ["asr 0 10-60"]),
        Step(ev.TranscriptIn(1.3, 0, "I would like"), ["reply 0 I would like"]),
        Step(ev.VadResume(1.4), ["cancel 0", "flush 0", "unsay 0", "record preemptive 0 abandoned"]),
        Step(ev.TokenIn(1.5, 0, 0, "Sure"), deny=["tokens"]),
        Step(ev.VadEnd(3.0, 10, 140, 300.0), ["asr 1 10-140", "phase thinking"]),
        Step(ev.TranscriptIn(3.2, 0, "I would like"), deny=["reply", "control"]),  # the abandoned one's: dropped
        Step(ev.TranscriptIn(3.3, 1, "I would like a table for two"), ["reply 1 I would like a table for two"]),
    ],
    "hard barge-in": [
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "Tell me a story")),
        *reply_played(1.8, 0),
        Step(ev.ClientInterrupt(2.5),
             ["record interrupt 0 client", "flush 0", "heard 0", "cancel 0", "control interrupted", "phase listening"]),
        Step(ev.FramePlayed(2.6, 0, last=True), deny=["agent"]),  # the context holds what was heard, nothing more
    ],
    "vad barge-in confirmed": [
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "Tell me a story")),
        *reply_played(1.8, 0),
        Step(ev.VadStart(3.0, 200), deny=["cancel", "pause"]),
        Step(ev.Tick(3.1), deny=["pause"]),  # 100 ms of speech: not yet
        Step(ev.Tick(3.2), ["record interrupt 0 vad", "pause", "cancel 0", "phase user_speaking"], deny=["flush"]),
        Step(ev.VadEnd(3.8, 200, 230, 300.0), ["asr 1 200-230"]),
        Step(ev.TranscriptIn(4.0, 1, "Stop, stop."), ["flush 0", "resume", "heard 0", "reply 1 Stop, stop."]),
    ],
    "resume after a false interruption": [
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "Tell me a story")),
        *reply_played(1.8, 0),
        Step(ev.VadStart(3.0, 200)),
        Step(ev.Tick(3.25), ["pause", "cancel 0"]),
        Step(ev.VadEnd(3.6, 200, 215, 300.0), ["asr 1 200-215"]),
        Step(ev.TranscriptIn(3.8, 1, ""), ["control transcript"], deny=["reply", "flush", "heard"]),
        Step(ev.Tick(4.0), deny=["resume"]),  # before the deadline
        Step(ev.Tick(4.8), ["resume", "record false_interruption 0", "control false_interruption",
                            "phase agent_speaking"]),
    ],
    "empty transcript": [
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "  "), ["control transcript", "phase listening"], deny=["reply"]),
    ],
    "failed job": [
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "Hello")),
        Step(ev.JobFailedIn(2.0, 0, "llm", "boom"), ["control error", "phase listening"]),
    ],
    "busy pool": [
        *said(0.0),
        Step(ev.JobBusy(1.5, 0, "asr", "over its deadline"), ["control busy", "cancel 0", "phase listening"]),
    ],
    "duplicate and late tokens": [
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "Hello")),
        Step(ev.TokenIn(1.6, 0, 0, "Hi"), ["tokens 0.0 Hi"]),
        Step(ev.TokenIn(1.61, 0, 0, "Hi"), deny=["tokens"]),  # a re-run job's repeat
        Step(ev.TokenIn(1.62, 0, 1, " you"), ["tokens 0.1  you"]),
        Step(ev.TokenIn(1.63, 7, 0, "?"), deny=["tokens"]),  # a turn that is not being answered
    ],
    "the caller goes on before any reply is heard: one turn": [
        *said(0.0, 10, 60),
        Step(ev.TranscriptIn(1.5, 0, "Thanks."), ["reply 0 Thanks."]),
        Step(ev.TokenIn(1.6, 0, 0, "You're"), ["tokens 0.0 You're"]),
        Step(ev.VadStart(1.7, 85), ["cancel 0", "flush 0", "unsay 0", "record merged 0", "phase user_speaking"]),
        Step(ev.TokenIn(1.8, 0, 1, " welcome"), deny=["tokens"]),
        Step(ev.AudioQueued(1.9, 0)),
        Step(ev.VadPause(3.0, 85, 150), ["asr 1 10-150"]),  # the whole range, from the first words
        Step(ev.TranscriptIn(3.2, 1, "Thanks. Can you spell it?"), ["reply 1 Thanks. Can you spell it?"]),
        Step(ev.VadEnd(3.2, 85, 150, 300.0), ["release", "phase thinking"], deny=["asr"]),
    ],
    "the caller goes on after the reply was heard: a barge-in": [
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "Thanks.")),
        *reply_played(1.6, 0),
        Step(ev.VadStart(2.0, 110), deny=["cancel", "record merged 0"]),
        Step(ev.Tick(2.25), ["record interrupt 0 vad", "pause", "cancel 0"]),
        Step(ev.VadEnd(3.0, 110, 140, 300.0), ["asr 1 110-140"]),
    ],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    run(SCENARIOS[name])


MODEL = TurnConfig(eot="smart-turn", eot_threshold=0.5, min_endpoint_ms=0.0, pause_ms=100.0)


def test_model_ends_a_complete_turn_at_the_pause() -> None:
    machine = run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.1, 10, 60), ["hold 0", "asr 0 10-60", "score 0 10-60"]),
        Step(ev.EotVerdict(1.14, 0, 0.97), ["record eot 0", "record turn_end 0 model", "release", "phase thinking"]),
        Step(ev.TranscriptIn(1.3, 0, "Can you spell it?"), ["control transcript", "reply 0 Can you spell it?"]),
        Step(ev.VadEnd(3.6, 10, 60, 2500.0), deny=["asr", "record turn_end"]),  # the VAD's timeout: already ended
    ], MODEL)
    assert machine.turn == 0


def test_model_keeps_listening_through_an_incomplete_pause() -> None:
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.1, 10, 60), ["score 0 10-60"]),
        Step(ev.EotVerdict(1.14, 0, 0.08), ["record eot 0"], deny=["record turn_end", "release"]),
        Step(ev.Tick(2.0), deny=["record turn_end"]),
        Step(ev.VadResume(2.2), ["cancel 0", "record preemptive 0 abandoned"]),
        Step(ev.VadPause(3.0, 10, 140), ["asr 1 10-140", "score 1 10-140"]),
        Step(ev.EotVerdict(3.04, 1, 0.91), ["record turn_end 1 model"]),
    ], MODEL)


def test_model_verdict_waits_for_min_endpoint() -> None:
    config = TurnConfig(eot="smart-turn", eot_threshold=0.5, min_endpoint_ms=300.0, pause_ms=100.0)
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.EotVerdict(1.04, 0, 0.9), deny=["record turn_end"]),
        Step(ev.Tick(1.1), deny=["record turn_end"]),
        Step(ev.Tick(1.2), ["record turn_end 0 model"]),
    ], config)


def test_a_late_verdict_is_ignored() -> None:
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.VadResume(1.02)),
        Step(ev.EotVerdict(1.05, 0, 0.99), ["record eot 0"], deny=["record turn_end"]),
    ], MODEL)


def test_continuation_after_a_model_end_joins_the_turn() -> None:
    """The model ended the turn at a pause, the caller went on: the VAD saw one utterance all along."""
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.EotVerdict(1.04, 0, 0.8), ["record turn_end 0 model"]),
        Step(ev.TranscriptIn(1.2, 0, "Thanks."), ["reply 0 Thanks."]),
        Step(ev.VadResume(1.5), ["cancel 0", "unsay 0", "record merged 0", "phase user_speaking"]),
        Step(ev.VadPause(3.0, 10, 150), ["asr 1 10-150", "score 1 10-150"]),
    ], MODEL)


def test_a_new_question_inside_the_vads_utterance_starts_after_the_answered_turn() -> None:
    """The model ended turn 0 at a pause and the agent answered; the caller asked again before the
    VAD's silence timeout, so for the VAD it is still the same utterance (start 10). Turn 1 is only
    the new speech: an ASR job from frame 10 would transcribe both questions as one."""
    machine = run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.EotVerdict(1.04, 0, 0.9), ["record turn_end 0 model"]),
        Step(ev.TranscriptIn(1.2, 0, "What is the capital of France?"), ["reply 0 What is the capital of France?"]),
        Step(ev.AudioQueued(1.5, 0, final=True)),
        Step(ev.FramePlayed(1.6, 0, first=True, last=False)),
        Step(ev.FramePlayed(2.4, 0, first=False, last=True), ["phase listening"]),
        Step(ev.VadResume(2.6), ["phase user_speaking"], deny=["record merged"]),
        Step(ev.VadPause(4.0, 10, 190), ["asr 1 61-190", "score 1 61-190"]),
        Step(ev.EotVerdict(4.04, 1, 0.9), ["record turn_end 1 model"]),
        Step(ev.VadEnd(6.6, 10, 190, 2500.0), deny=["asr", "record turn_end"]),  # the VAD's timeout: already ended
    ], MODEL)
    assert machine.turn == 1


def test_interrupt_while_nothing_plays_is_ignored() -> None:
    run([Step(ev.ClientInterrupt(0.5), exact=True)])


def test_a_continuation_never_spans_more_than_max_merge() -> None:
    config = TurnConfig(max_merge_ms=1000.0)
    run([
        *said(0.0, 10, 60),
        Step(ev.TranscriptIn(1.5, 0, "Thanks.")),
        Step(ev.VadStart(5.0, 260), deny=["record merged 0", "cancel"]),
    ], config)


def test_the_model_is_asked_again_while_the_caller_stays_silent() -> None:
    config = TurnConfig(eot="smart-turn", eot_threshold=0.5, rescore_ms=200.0, pause_ms=100.0)
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60), ["score 0 10-60"]),
        Step(ev.Tick(1.1), deny=["score"]),  # one request at a time
        Step(ev.EotVerdict(1.15, 0, 0.2), deny=["record turn_end"]),
        Step(ev.Tick(1.19), deny=["score"]),
        Step(ev.Tick(1.2), ["score 0 10-60"]),  # 200 ms after the last request
        Step(ev.EotVerdict(1.25, 0, 0.7), ["record turn_end 0 model"]),
        Step(ev.Tick(1.5), deny=["score"]),
    ], config)


BUSY = TurnConfig(busy_message="Sorry, busy.", reply_timeout_ms=5000.0)


def test_a_late_job_makes_the_agent_say_it_is_busy() -> None:
    run([
        *said(0.0),
        Step(ev.JobBusy(2.0, 0, "asr", "the asr pool is overloaded"),
             ["control busy", "cancel 0", "record busy 0", "say 1 Sorry, busy.", "phase thinking"]),
        Step(ev.AudioQueued(2.5, 1)),
        Step(ev.FramePlayed(2.6, 1, first=True), ["phase agent_speaking"]),
        Step(ev.FramePlayed(4.0, 1, last=True), ["phase listening"], deny=["agent"]),  # not in the context
    ], BUSY)
    machine = run([*said(0.0), Step(ev.JobBusy(2.0, 0, "asr", "x"))], BUSY)
    assert machine.agent_turn == 1  # the apology is the agent's own turn


def test_a_late_end_of_turn_verdict_is_not_a_busy_agent() -> None:
    run([*said(0.0), Step(ev.JobBusy(1.4, 0, "eot", "late"), ["record busy 0"], deny=["control busy", "cancel"])], BUSY)


def test_silence_after_a_turn_becomes_busy_at_the_reply_timeout() -> None:
    """A pool with no live worker never answers and never drops the job: the bridge notices itself."""
    run([
        *said(0.0),
        Step(ev.TranscriptIn(1.5, 0, "Hello?"), ["reply 0 Hello?"]),
        Step(ev.Tick(6.0), deny=["control busy"]),
        Step(ev.Tick(6.4), ["control busy", "cancel 0"]),
        Step(ev.Tick(7.0), deny=["control busy"]),
    ], BUSY)


def test_a_late_job_of_a_speculative_turn_only_drops_the_speculation() -> None:
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.1, 10, 60), ["asr 0 10-60"]),
        Step(ev.JobBusy(1.2, 0, "asr", "late"), ["record preemptive 0 abandoned", "cancel 0"], deny=["control busy"]),
        Step(ev.VadEnd(1.3, 10, 60, 300.0), ["asr 1 10-60", "phase thinking"]),
        Step(ev.JobBusy(1.5, 1, "asr", "late"), ["control busy", "say 2 Sorry, busy."]),
    ], BUSY)


# ------------------------------------------------------------------ the words join the model (eot_language)

HYBRID = TurnConfig(eot="smart-turn", eot_threshold=0.5, eot_fast_threshold=0.9, min_endpoint_ms=300.0,
                    eot_language="en", pause_ms=100.0)


def test_a_continuation_cue_keeps_a_complete_verdict_from_ending_the_turn() -> None:
    """The audio model hears a falling voice on "...a table for" and says done; the words say not.
    (The audio model alone ended this turn at the verdict.)"""
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60), ["asr 0 10-60", "score 0 10-60"]),
        Step(ev.EotVerdict(1.04, 0, 0.97), ["record eot 0"], deny=["record turn_end"]),
        Step(ev.TranscriptIn(1.2, 0, "I would like to book a table for"), ["record eot_cue 0"],
             deny=["record turn_end", "release"]),
        Step(ev.Tick(2.0), deny=["record turn_end", "score"]),  # no verdict can end it: no more asking
        Step(ev.VadResume(2.1), ["record preemptive 0 abandoned"]),
        Step(ev.VadPause(3.0, 10, 140), ["asr 1 10-140", "score 1 10-140"]),
        Step(ev.TranscriptIn(3.2, 1, "I would like to book a table for four people."), deny=["record eot_cue"]),
        Step(ev.EotVerdict(3.25, 1, 0.95), ["record turn_end 1 model", "release"]),
    ], HYBRID)


def test_a_cue_leaves_the_end_to_the_vads_timeout() -> None:
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.TranscriptIn(1.15, 0, "My name is"), ["record eot_cue 0"]),
        Step(ev.EotVerdict(1.2, 0, 0.99), deny=["record turn_end"]),
        Step(ev.VadEnd(3.5, 10, 60, 2500.0), ["record turn_end 0 vad", "release", "control transcript"], deny=["asr"]),
    ], HYBRID)


def test_a_confident_verdict_with_finished_words_ends_the_turn_at_once() -> None:
    """p >= eot_fast_threshold: no min_endpoint_ms wait, only the transcript's (the reply needs it anyway)."""
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.EotVerdict(1.04, 0, 0.97), deny=["record turn_end"]),  # the words are not in yet
        Step(ev.TranscriptIn(1.15, 0, "Can you spell the name of that city for me?"),
             ["reply 0 Can you spell the name of that city for me?", "record turn_end 0 model", "release"]),
    ], HYBRID)
    run([  # the transcript first, then the verdict
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.TranscriptIn(1.1, 0, "Who is it for?"), deny=["record turn_end", "record eot_cue"]),
        Step(ev.EotVerdict(1.14, 0, 0.95), ["record turn_end 0 model"]),
    ], HYBRID)


def test_a_moderate_verdict_waits_min_endpoint_of_silence() -> None:
    """eot_threshold <= p < eot_fast_threshold: ended once min_endpoint_ms of silence passed (pause_ms included).
    (The audio model alone, min_endpoint_ms 0, ended it at the verdict.)"""
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.EotVerdict(1.04, 0, 0.7)),
        Step(ev.TranscriptIn(1.1, 0, "Yes, that works for me."), deny=["record turn_end"]),
        Step(ev.Tick(1.18), deny=["record turn_end"]),
        Step(ev.Tick(1.2), ["record turn_end 0 model"]),
    ], HYBRID)
    run([  # the caller goes on within min_endpoint_ms: one turn, never cut
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.EotVerdict(1.04, 0, 0.7)),
        Step(ev.TranscriptIn(1.1, 0, "Thanks.")),
        Step(ev.VadResume(1.16), ["record preemptive 0 abandoned"], deny=["record turn_end"]),
    ], HYBRID)


def test_finished_words_do_not_overrule_an_incomplete_verdict() -> None:
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.TranscriptIn(1.1, 0, "What is the capital of France?")),
        Step(ev.EotVerdict(1.14, 0, 0.2), deny=["record turn_end"]),
        Step(ev.Tick(1.34), ["score 0 10-60"], deny=["record turn_end"]),  # asked again as the silence grows
        Step(ev.EotVerdict(1.38, 0, 0.8), ["record turn_end 0 model"]),  # moderate, after min_endpoint_ms of silence
    ], HYBRID)


def test_a_caller_who_has_held_the_floor_gets_longer_to_go_on() -> None:
    """min_endpoint_per_s: a 5 s turn waits 150 ms x 5.02 s = 753 ms of silence even on a confident verdict.
    (The old rule ended a reading at its first full stop.)"""
    config = TurnConfig(eot="smart-turn", eot_threshold=0.5, eot_fast_threshold=0.9, min_endpoint_ms=300.0,
                        min_endpoint_per_s=150.0, eot_language="en", pause_ms=100.0)
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(5.0, 10, 260)),
        Step(ev.EotVerdict(5.04, 0, 0.97)),
        Step(ev.TranscriptIn(5.15, 0, "It was the best of times, it was the worst of times."),
             deny=["record turn_end"]),
        Step(ev.Tick(5.64), deny=["record turn_end"]),
        Step(ev.Tick(5.66), ["record turn_end 0 model"]),
    ], config)
    run([  # a short question on the same settings: 150 ms x 1.02 s is less than the transcript's wait
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.1, 10, 60)),
        Step(ev.EotVerdict(1.14, 0, 0.97)),
        Step(ev.TranscriptIn(1.25, 0, "What time do you open tomorrow?"), ["record turn_end 0 model"]),
    ], config)


def test_vad_only_turns_never_read_cues() -> None:
    config = TurnConfig(eot="none", eot_language="en")
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.TranscriptIn(1.15, 0, "My name is"), deny=["record eot_cue", "record turn_end"]),
        Step(ev.VadEnd(1.3, 10, 60, 300.0), ["record turn_end 0 vad"]),
    ], config)


def test_without_a_cue_language_the_model_alone_decides() -> None:
    config = TurnConfig(eot="smart-turn", eot_threshold=0.5, eot_fast_threshold=0.9, min_endpoint_ms=300.0,
                        pause_ms=100.0)
    run([
        Step(ev.VadStart(0.0, 10)),
        Step(ev.VadPause(1.0, 10, 60)),
        Step(ev.EotVerdict(1.04, 0, 0.95), ["record turn_end 0 model"]),  # fast, and no transcript needed
        Step(ev.TranscriptIn(1.2, 0, "I would like to book a table for"), deny=["record eot_cue"]),
    ], config)


@pytest.mark.parametrize(("text", "cue"), [
    ("I would like to book a table for", "word:for"),
    ("I'd like the chicken and...", "ellipsis"),
    ("We need tomatoes, onions,", "comma"),
    ("Um", "filler:um"),
    ("So.", "filler:so"),
    ("Well, the thing is, uh", "filler:uh"),
    ("First I went to the bank and then", "phrase:and then"),
    ("If it rains tomorrow then", "phrase:if ... then"),
    ("My name is", "copula:is"),
    ("The reason I'm calling is", "copula:is"),
    ("Turn on the lights in the", "word:the"),
    ("My number is 5 5 5", "digits"),
    ("My number is five five five, two three four", "digits"),
    ("The card number is 4111 2222.", "digits"),
    ("What is the capital of Germany?", None),
    ("Who is it for?", None),  # questions strand prepositions
    ("Yes, it is.", None),  # a linking verb after a pronoun: a short answer
    ("No, I don't think so.", None),
    ("Okay.", None),
    ("My order number is 4567.", None),
    ("Set an alarm for six thirty.", None),
    ("", None),
])
def test_continuation_cues(text: str, cue: str | None) -> None:
    assert continuation_cue(text, cues_for("en")) == cue


def test_extra_cues_and_other_languages() -> None:
    assert continuation_cue("I'll have it delivered whereas", cues_for("en")) is None
    assert continuation_cue("I'll have it delivered whereas", cues_for("en", ("whereas",))) == "word:whereas"
    assert continuation_cue("Send it in case", cues_for("en", ("in case",))) == "phrase:in case"
    assert continuation_cue("Ich möchte einen Tisch für", cues_for("de")) == "word:für"
    assert continuation_cue("Ich möchte einen Tisch für vier.", cues_for("de")) is None


def test_the_bridge_settings_reach_the_machine_and_are_checked() -> None:
    import msgspec

    from shared.config import BridgeConfig, ConfigError, load_config, parse_config

    base = load_config()
    cfg = TurnConfig.from_bridge(msgspec.structs.replace(base.bridge, eot="model", eot_language="none",
                                                          eot_extra_cues=["whereas"], eot_fast_threshold=0.95))
    assert (cfg.eot, cfg.eot_language, cfg.eot_extra_cues, cfg.eot_fast_threshold) == ("model", "", ("whereas",), 0.95)
    assert TurnConfig.from_bridge(BridgeConfig()).eot_language == "en"
    pools = {name: msgspec.to_builtins(pool) for name, pool in base.pools.items()}
    from typing import get_args, get_type_hints

    languages = get_args(get_type_hints(BridgeConfig)["eot_language"])
    assert set(languages) == set(LANGUAGES) | {"none"}  # every language the pools file takes has its cues
    for bad, what in [({"eot_language": "xx"}, "bridge.eot_language"),
                      ({"eot_fast_threshold": 0.3}, "bridge.eot_fast_threshold"),
                      ({"eot_extra_cues": [" "]}, "bridge.eot_extra_cues")]:
        with pytest.raises(ConfigError, match=what):
            parse_config({"pools": pools, "defaults": dict(base.defaults), "bridge": {"eot": "model", **bad}})
