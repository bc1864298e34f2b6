"""What the turn machine's `Record` commands leave behind: entries in the session's events stream
(the recording, which `voxbus replay` and `voxbus inspect` read), Prometheus metrics, and the
turn's latency waterfall."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shared import metrics
from shared.bus import BatchPublisher
from shared.protocol import Interrupt, Keys, TurnMark

from . import turn_events as ev
from .waterfall import TurnTimes

log = logging.getLogger("voxbus.session")


def record(publisher: BatchPublisher, sid: str, cmd: ev.Record, t: TurnTimes,
           frame_ts: Callable[[int], float | None]) -> None:
    """A turn machine `Record`: into the session's events (the recording), the metrics and the waterfall."""
    publish = publisher.publish_nowait
    events = Keys.events(sid)
    kind, turn, data = cmd.kind, cmd.turn, cmd.data
    if kind == "turn_end":
        t.endpoint_ts = time.time()
        t.speech_end_ts = frame_ts(data["end_frame"]) or t.endpoint_ts
        t.endpoint_ms, t.endpoint_by = data["silence_ms"], data["by"]
        metrics.ENDPOINTING_MS.observe(data["silence_ms"])
        metrics.TURN_ENDS.labels(data["by"]).inc()
        publish(events, TurnMark(session=sid, turn=turn, stage="turn", mark=f"end_{data['by']}",
                                 value_ms=data["silence_ms"]))
    elif kind == "eot":
        t.eot_prob = data["prob"]
        metrics.EOT_DECISIONS.labels("complete" if data["complete"] else "incomplete").inc()
        metrics.EOT_PROB.observe(data["prob"])
    elif kind == "preemptive":
        metrics.PREEMPTIVE_TURNS.labels(data["outcome"]).inc()
        publish(events, TurnMark(session=sid, turn=turn, stage="turn", mark=f"preemptive_{data['outcome']}"))
    elif kind == "interrupt":
        metrics.BARGE_INS.labels(data["source"]).inc()
        publish(events, Interrupt(session=sid, source=data["source"], turn=turn))
        log.info("session %s: %s barge-in on turn %d", sid, data["source"], turn)
    elif kind == "false_interruption":
        metrics.FALSE_INTERRUPTIONS.inc()
        publish(events, TurnMark(session=sid, turn=turn, stage="bridge", mark="false_interruption"))
    elif kind == "busy":
        metrics.TURNS_BUSY.labels(data["stage"]).inc()
        publish(events, TurnMark(session=sid, turn=turn, stage="turn", mark=f"busy_{data['stage']}"))
    elif kind == "merged":
        metrics.TURNS_MERGED.inc()
        publish(events, TurnMark(session=sid, turn=turn, stage="turn", mark="merged"))


def playout_mark(publisher: BatchPublisher, sid: str, turn: int, mark: str, played_ms: float) -> None:
    """Where the caller's playout of `turn` stands, into the recording: "start" (first frame
    sent), "end" (last frame sent) or "flushed" (a barge-in cut it), with the audio sent so far."""
    publisher.publish_nowait(Keys.events(sid), TurnMark(session=sid, turn=turn, stage="playout", mark=mark,
                                                         value_ms=round(played_ms, 1)))
