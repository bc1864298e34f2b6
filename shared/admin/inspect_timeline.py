"""`voxbus inspect`, the layout: a recorded session as rows of turns on one time axis.

Pure: a `Recording` (and the wall-clock time of caller frame 0) in, a `Timeline`
(`inspect_model`) out, with every time in seconds from that origin. No audio
and no HTML here (`inspect_audio` makes the tracks, `inspect_html` draws them).

A row is one turn as the caller lived it: the turn ids the bridge handed out
for one utterance are chained into the row of the last one, so a preemptive
turn abandoned because the caller went on speaking, and a turn merged into
its continuation, sit in the row of the turn that finally answered. Every
event, job and marker belongs to exactly one row: the row of its turn id, or
for an event without one, the row running at its time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..caller_audio import agent_seconds
from ..protocol import (
    AudioOut,
    Cancelled,
    ChatMessage,
    EotDecision,
    Interrupt,
    JobDropped,
    JobFailed,
    JobOutcome,
    JobRun,
    OpusOut,
    ProtocolError,
    SessionMeta,
    SpeechEnd,
    SpeechPause,
    SpeechStart,
    TokenChunk,
    Transcript,
    TurnMark,
    decode,
)
from .inspect_model import FRAME_S, MAX_LOOKBACK_S, PAD_S, Job, Marker, Playout, Point, Rel, Span, Timeline, TurnRow
from .inspect_waterfall import totals, waterfall
from .recording import Recording


def build(rec: Recording, origin: float | None = None, caller_s: float = 0.0) -> Timeline:
    """The timeline of a recording; `origin`: wall clock of caller frame 0 (default: the first message),
    `caller_s`: how long the caller's audio runs."""
    events, tokens = rec.messages("events"), rec.messages("tokens")
    tokens = sorted((m for m in tokens if isinstance(m, TokenChunk)), key=lambda m: (m.turn, m.seq))
    outs = sorted((m for m in rec.messages("audio.out") if isinstance(m, AudioOut | OpusOut)), key=lambda m: (m.turn, m.seq))
    if origin is None:
        origin = min((m.ts for m in [*events, *tokens, *outs]), default=rec.exported_at)

    def rel(ts: float) -> float:
        return ts - origin

    tl = Timeline(session=rec.session, origin=origin, duration=0.0, transport=_transport(rec))
    tl.speech, tl.pauses = _vad(events, rel)
    marks = [m for m in events if isinstance(m, TurnMark)]
    audio_ms: dict[int, float] = {}
    for out in outs:
        audio_ms[out.turn] = audio_ms.get(out.turn, 0.0) + agent_seconds(out) * 1000
    tl.playouts = _playouts(marks, rel, audio_ms)
    first_ts: dict[int, float] = {}
    for m in [*events, *tokens, *outs]:
        turn = getattr(m, "turn", -1)
        if turn >= 0:
            first_ts[turn] = min(first_ts.get(turn, m.ts), m.ts)
    passed_on = {m.turn for m in marks if m.mark in ("preemptive_abandoned", "merged")}
    tl.rows = _chain(sorted(first_ts), passed_on)
    row_of = {t: row for row in tl.rows for t in row.turns}

    pending: list[tuple[float, Marker | Job | Point]] = []  # items of no turn: placed once the windows are known
    for m in events:
        row = row_of.get(getattr(m, "turn", -1))
        for item in _items(m, rel, tl.playouts):
            if row is None:
                pending.append((item.queued if isinstance(item, Job) else item.t, item))
            else:
                _add(row, item)
    said: dict[int, list[str]] = {}
    for tok in (t for t in tokens if t.turn in row_of):
        row_of[tok.turn].tokens.append(Point(rel(tok.ts), tok.text, f"+{rel(tok.ts):.3f} s, token {tok.seq} of turn {tok.turn}"))
        said.setdefault(tok.turn, []).append(tok.text)
    _tts(outs, row_of, rel)
    heard = _heard_texts(rec)
    starts = [m for m in events if isinstance(m, SpeechStart)]
    for row in tl.rows:
        row.agent_text = "".join(said.get(row.turn, [])).strip()
        row.heard_text = heard.get(row.turn)
        _fill(row, events, starts, rel, tl.playouts, first_ts)
    for t, item in pending:
        row = next((r for r in reversed(tl.rows) if r.t0 <= t), tl.rows[0] if tl.rows else None)
        if row is not None:
            _add(row, item)
            row.t0, row.t1 = min(row.t0, t - PAD_S), max(row.t1, t + PAD_S)
    tl.jobs = sorted((j for row in tl.rows for j in row.jobs), key=lambda j: (j.queued, j.started))
    tl.duration = max([caller_s, *(r.t1 for r in tl.rows), *(s.t1 for s in tl.speech)])
    tl.totals = totals(tl)
    return tl


def _transport(rec: Recording) -> str:
    if not rec.meta:
        return ""
    try:
        meta = decode(rec.meta)
    except ProtocolError:
        return ""
    return meta.transport if isinstance(meta, SessionMeta) else ""


def _vad(events: list[Any], rel: Rel) -> tuple[list[Span], list[Span]]:
    """Voiced segments (SpeechStart .. SpeechEnd, in frames) and the pauses inside them."""
    speech: list[Span] = []
    pauses: list[Span] = []
    start: int | None = None
    last_voiced = 0
    pause_at: float | None = None
    for m in events:
        if isinstance(m, SpeechStart):
            start, last_voiced, pause_at = m.frame, m.frame, None
        elif isinstance(m, SpeechPause):
            last_voiced = max(last_voiced, m.end_frame)
            if not m.resumed:
                pause_at = (m.end_frame + 1) * FRAME_S
            elif pause_at is not None:
                pauses.append(Span(pause_at, rel(m.ts), "pause", f"pause {rel(m.ts) - pause_at:.2f} s, then the caller went on"))
                pause_at = None
        elif isinstance(m, SpeechEnd):
            begin = start if start is not None else m.start_frame
            t1 = (m.end_frame + 1) * FRAME_S
            speech.append(Span(begin * FRAME_S, t1, "speech", f"speech frames {begin}-{m.end_frame} ({t1 - begin * FRAME_S:.2f} s)"))
            pauses.append(Span(t1, max(t1, rel(m.ts)), "end", f"the VAD's end of speech after {m.silence_ms:.0f} ms of silence"))
            start, pause_at = None, None
    if start is not None:  # the call ended mid-utterance
        t1 = (last_voiced + 1) * FRAME_S
        speech.append(Span(start * FRAME_S, t1, "speech", f"speech from frame {start} (no end recorded)"))
    return speech, pauses


def _playouts(marks: list[TurnMark], rel: Rel, audio_ms: dict[int, float]) -> dict[int, Playout]:
    """Each played turn's playout; one that never ended (the call did) counts all its audio as heard."""
    out: dict[int, Playout] = {}
    for m in marks:
        if m.stage != "playout":
            continue
        have = out.get(m.turn)
        if m.mark == "start":
            out[m.turn] = Playout(m.turn, rel(m.ts))
        elif have is not None and m.mark == "flushed":
            out[m.turn] = Playout(m.turn, have.start, m.value_ms, have.end, flushed=True)
        elif have is not None and m.mark == "end" and not have.flushed:
            out[m.turn] = Playout(m.turn, have.start, m.value_ms, rel(m.ts))
    for turn, play in out.items():
        if play.heard_ms is None:
            out[turn] = Playout(turn, play.start, audio_ms.get(turn, 0.0))
    return out


def _chain(turn_ids: list[int], passed_on: set[int]) -> list[TurnRow]:
    """Rows: an abandoned or merged turn id goes on in the next turn id."""
    rows: list[TurnRow] = []
    current: list[int] = []
    for turn in turn_ids:
        current.append(turn)
        if turn not in passed_on:
            rows.append(TurnRow(turn=turn, turns=current))
            current = []
    if current:
        rows.append(TurnRow(turn=current[-1], turns=current))
    return rows


def _items(m: Any, rel: Rel, playouts: dict[int, Playout]) -> Iterable[Marker | Job | Point]:
    """What one event shows: markers, a job, a point on a lane."""
    if isinstance(m, JobRun):
        job = Job(m.turn, m.stage, m.pool, m.gpu_type, m.worker, m.entry_id, rel(m.queued), rel(m.started), rel(m.ended),
                  str(m.outcome), m.deliveries, m.reason)
        yield job
        if m.deliveries > 1:
            yield Marker("retry", job.started, m.turn, f"{m.stage} job {m.entry_id} on {m.pool}: delivery {m.deliveries}")
        if m.outcome == JobOutcome.RETRIED:
            yield Marker("failure", job.ended, m.turn, f"{m.stage} job {m.entry_id} failed on {m.worker}: {m.reason}")
    elif isinstance(m, Interrupt):
        play = playouts.get(m.turn)
        at = rel(m.ts)
        title = f"{m.source} interrupt of turn {m.turn} at +{at:.3f} s"
        if play is not None and play.flushed and play.heard_ms is not None:
            at = play.start + play.heard_ms / 1000
            title += f"; playout cut after {play.heard_ms:.0f} ms of the reply"
        yield Marker("barge-in", at, m.turn, title)
    elif isinstance(m, Cancelled):
        yield Marker("cancel", rel(m.ts), m.turn, f"{m.stage}: {m.reason}")
    elif isinstance(m, JobFailed):
        yield Marker("dead-letter", rel(m.ts), m.turn, f"{m.stage}: {m.reason}")
    elif isinstance(m, JobDropped):
        yield Marker("late", rel(m.ts), m.turn, f"{m.stage} job dropped by {m.pool}, {m.late_ms:.0f} ms past its deadline")
    elif isinstance(m, EotDecision):
        yield Point(rel(m.ts), f"{m.prob:.2f}", f"end of turn: P={m.prob:.3f} over frames {m.start_frame}-{m.end_frame} "
                    f"(model {m.cost_ms:.0f} ms)", "eot")
    elif isinstance(m, Transcript):
        kind = "final" if m.final else "partial"
        yield Point(rel(m.ts), m.text, f"{kind} transcript, frames {m.start_seq}-{m.end_seq}, ASR {m.asr_ms:.0f} ms: {m.text}",
                    kind)
    elif isinstance(m, TurnMark):
        yield from _mark_items(m, rel, playouts)


def _mark_items(m: TurnMark, rel: Rel, playouts: dict[int, Playout]) -> Iterable[Marker]:
    at = rel(m.ts)
    kind = {"preemptive_started": "preemptive-start", "preemptive_abandoned": "preemptive-abandon",
            "preemptive_confirmed": "preemptive-confirm", "merged": "merged", "false_interruption": "false-interruption",
            "end_vad": "endpoint", "end_model": "endpoint"}.get(m.mark)
    if kind == "endpoint":
        yield Marker(kind, at, m.turn, f"end of turn by {m.mark[4:]}, after {m.value_ms:.0f} ms of silence")
    elif kind:
        yield Marker(kind, at, m.turn, f"turn {m.turn}: {m.mark.replace('_', ' ')}")
    elif m.mark.startswith("overflow:"):
        yield Marker("overflow", at, m.turn, f"{m.stage} job routed {m.mark.partition(':')[2]}")
    elif m.mark.startswith("busy_"):
        yield Marker("busy", at, m.turn, f"busy: the {m.mark[5:]} pool is behind")
    elif m.stage == "playout" and m.mark == "flushed":
        play = playouts.get(m.turn)
        cut = play.start + m.value_ms / 1000 if play is not None else at
        yield Marker("cut", cut, m.turn, f"playout of turn {m.turn} flushed after {m.value_ms:.0f} ms heard")


def _add(row: TurnRow, item: Marker | Job | Point) -> None:
    if isinstance(item, Marker):
        row.markers.append(item)
    elif isinstance(item, Job):
        row.jobs.append(item)
    elif item.kind == "eot":
        row.eot.append(item)
    else:
        row.asr.append(item)


def _tts(outs: list[AudioOut | OpusOut], row_of: dict[int, TurnRow], rel: Rel) -> None:
    """TTS chunks laid end to end from when each was published: how far ahead of playout the audio was."""
    ready: dict[int, float] = {}
    for m in sorted(outs, key=lambda m: (m.turn, m.seq)):
        row = row_of.get(m.turn)
        dur = agent_seconds(m)
        if row is None or not dur:
            continue
        t0 = max(rel(m.ts), ready.get(m.turn, float("-inf")))
        ready[m.turn] = t0 + dur
        row.tts.append(Span(t0, t0 + dur, m.text, f"chunk {m.seq}: {dur * 1000:.0f} ms of audio, published at +{rel(m.ts):.3f} s"
                            + (f": {m.text}" if m.text else "")))


def _heard_texts(rec: Recording) -> dict[int, str]:
    """What the context kept of interrupted replies: the words the caller heard."""
    out: dict[int, str] = {}
    for raw in rec.ctx:
        try:
            msg = decode(raw)
        except ProtocolError:
            continue
        if isinstance(msg, ChatMessage) and msg.role == "assistant" and msg.interrupted:
            out[msg.turn] = msg.text
    return out


def _fill(row: TurnRow, events: list[Any], starts: list[SpeechStart], rel: Rel, playouts: dict[int, Playout],
          first_ts: dict[int, float]) -> None:
    """Caller text, status, waterfall and time window of one row."""
    turns = set(row.turns)
    finals = [m for m in events if isinstance(m, Transcript) and m.final and m.turn in turns and m.text.strip()]
    mine = [f for f in finals if f.turn == row.turn] or finals
    row.user_text = mine[-1].text if mine else ""
    row.waterfall = waterfall(row.turn, events, rel, playouts)
    first = min((first_ts[t] for t in row.turns if t in first_ts), default=None)
    t_first = rel(first) if first is not None else 0.0
    voiced = [f.start_seq * FRAME_S for f in finals]
    if not voiced and first is not None:  # no transcript: the utterance that was going on (not one long gone)
        voiced = [s.frame * FRAME_S for s in starts if first - MAX_LOOKBACK_S < s.ts <= first][-1:]
    play = playouts.get(row.turn)
    heard_end = [play.start + (play.heard_ms or 0.0) / 1000] if play is not None else []
    times = [t_first, *voiced, *(j.queued for j in row.jobs), *(j.ended for j in row.jobs), *(m.t for m in row.markers),
             *(p.t for p in row.tokens + row.eot + row.asr), *(s.t1 for s in row.tts), *heard_end]
    row.t0, row.t1 = min(times) - PAD_S, max(times) + PAD_S
    if any(m.kind in ("barge-in", "cut") for m in row.markers):
        row.status = "interrupted"
    elif play is not None:
        row.status = "answered"
    elif any(m.kind in ("preemptive-abandon", "merged") and m.turn == row.turn for m in row.markers):
        row.status = "abandoned"
    else:
        row.status = "not heard" if row.tts else "no reply"


