"""`voxbus inspect`, one turn's row as HTML: its lanes on the row's own time axis.

Everything is positioned in percent of the row's window, so the row scales with
the page; the page's script only draws the waveforms from their peaks, keeps
labels from overlapping and moves the playhead. Each marker, job bar and row
carries data attributes (`data-marker`, `data-job-bar`, `data-turn`) that the
tests count.
"""

from __future__ import annotations

import base64
from html import escape

from .inspect_audio import AUDIO_MIME, RowMedia, data_uri
from .inspect_model import STAGES, Job, Marker, Point, Span, Timeline, TurnRow

LANES = ("markers", "caller", "eot", "asr", "llm", "tts", "agent", *(f"job-{s}" for s in STAGES))
MARKER_LABELS: dict[str, str] = {
    "preemptive-start": "pre", "preemptive-abandon": "pre ×", "preemptive-confirm": "pre ✓", "endpoint": "end",
    "merged": "merged", "barge-in": "barge-in", "cut": "cut", "false-interruption": "false int.", "cancel": "cancel",
    "overflow": "overflow", "retry": "retry", "failure": "failed", "dead-letter": "dead letter", "late": "late",
    "busy": "busy",
}


def attr(value: object) -> str:
    return escape(str(value), quote=True)


def secs(t: float) -> str:
    return f"+{t:.2f} s"


class Row:
    """Positions on one row's window."""

    def __init__(self, row: TurnRow) -> None:
        self.row = row
        self.span = max(1e-6, row.t1 - row.t0)

    def x(self, t: float) -> float:
        return round(min(100.0, max(0.0, (t - self.row.t0) / self.span * 100)), 3)

    def w(self, t0: float, t1: float) -> float:
        return round(max(0.0, self.x(t1) - self.x(t0)), 3)

    def point(self, p: Point, cls: str) -> str:
        return (f'<i class="pt {cls}" style="left:{self.x(p.t)}%" title="{attr(p.title)}">'
                f"<b>{escape(p.label.strip()) or '&#183;'}</b></i>")

    def span_el(self, s: Span, cls: str, extra: str = "") -> str:
        label = f"<b>{escape(s.label)}</b>" if s.label and cls.startswith("tts") else ""
        return (f'<i class="sp {cls}" style="left:{self.x(s.t0)}%;width:{self.w(s.t0, s.t1)}%" '
                f'title="{attr(s.title)}"{extra}>{label}</i>')

    def marker(self, m: Marker) -> str:
        return (f'<span class="mk k-{m.kind}" data-marker="{m.kind}" data-turn="{m.turn}" data-t="{m.t:.3f}" '
                f'style="left:{self.x(m.t)}%" title="{attr(secs(m.t) + "  " + m.title)}">{MARKER_LABELS[m.kind]}</span>')

    def job(self, j: Job) -> str:
        title = (f"{j.stage} turn {j.turn} on {j.pool} ({j.gpu_type}), worker {j.worker}: queued {secs(j.queued)}, "
                 f"waited {j.wait_ms:.0f} ms, ran {j.run_ms:.0f} ms, {j.outcome}"
                 + (f", delivery {j.deliveries}" if j.deliveries > 1 else "") + (f": {j.reason}" if j.reason else ""))
        wait = f'<i class="jw" style="left:{self.x(j.queued)}%;width:{self.w(j.queued, j.started)}%"></i>'
        run = (f'<i class="jr o-{attr(j.outcome)}" data-job-bar="{attr(j.key)}" data-turn="{j.turn}" '
               f'style="left:{self.x(j.started)}%;width:{self.w(j.started, j.ended)}%" title="{attr(title)}">'
               f"<b>{escape(j.worker)}</b></i>")
        return wait + run


def ticks(r: Row) -> str:
    steps = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
    step = next((s for s in steps if r.span / s <= 12), steps[-1])
    first = int(r.row.t0 // step + 1)
    out = []
    t = first * step
    while t < r.row.t1:
        out.append(f'<i class="tick" style="left:{r.x(t)}%"><b>{t:g} s</b></i>')
        t = round(t + step, 6)
    return "".join(out)


def _lane(name: str, label: str, inner: str) -> str:
    return f'<div class="lane l-{name}"><span class="lname">{label}</span><div class="track">{inner}</div></div>'


def _wave(peaks: bytes, cls: str) -> str:
    return f'<canvas class="wave {cls}" data-peaks="{base64.b64encode(peaks).decode()}"></canvas>'


def lanes(tl: Timeline, row: TurnRow, media: RowMedia) -> str:
    r = Row(row)
    inside = [s for s in tl.speech if s.t1 > row.t0 and s.t0 < row.t1]
    gaps = [s for s in tl.pauses if s.t1 > row.t0 and s.t0 < row.t1]
    caller = _wave(media.caller_peaks, "w-caller") + "".join(r.span_el(s, "vad") for s in inside) + "".join(
        r.span_el(s, f"gap g-{s.label}") for s in gaps)
    agent = _wave(media.agent_peaks, "w-agent")
    for turn in row.turns:
        play = tl.playouts.get(turn)
        if play is not None:
            end = play.start + (play.heard_ms or 0.0) / 1000
            agent += r.span_el(Span(play.start, end, "", f"turn {turn} heard {secs(play.start)} to {secs(end)}"
                                    + (" (cut by a barge-in)" if play.flushed else "")), "heard")
            if play.flushed:
                agent += f'<i class="cutline" style="left:{r.x(end)}%"></i>'
    body = [
        _lane("axis", "", ticks(r)),
        _lane("markers", "markers", "".join(r.marker(m) for m in sorted(row.markers, key=lambda m: m.t))),
        _lane("caller", "caller", caller),
        _lane("eot", "end of turn", "".join(r.point(p, "eot") for p in row.eot)),
        _lane("asr", "ASR", "".join(r.point(p, f"asr {p.kind}") for p in row.asr)),
        _lane("llm", "LLM tokens", "".join(r.point(p, "tok") for p in row.tokens)),
        _lane("tts", "TTS chunks", "".join(r.span_el(s, "tts") for s in row.tts)),
        _lane("agent", "agent heard", agent),
    ]
    for stage in STAGES:
        jobs = [j for j in row.jobs if j.stage == stage]
        body.append(_lane(f"job-{stage}", f"{stage} jobs", "".join(r.job(j) for j in jobs)))
    lines = "".join(f'<i class="vl k-{m.kind}" style="left:{r.x(m.t)}%"></i>' for m in row.markers)
    over = f'<div class="over" title="click to play from here">{lines}<i class="playhead"></i></div>'
    return f'<div class="tl">{"".join(body)}{over}</div>'


def turn_html(side: str, tl: Timeline, row: TurnRow, media: RowMedia) -> str:
    earlier = [t for t in row.turns if t != row.turn]
    note = ""
    if earlier:
        how = ", ".join(f"turn {t} ({_fate(row, t)})" for t in earlier)
        note = f'<div class="note">this utterance also had {how}</div>'
    audio = (f'<audio controls preload="auto" data-turn="{row.turn}" src="{data_uri(media.audio, AUDIO_MIME)}"></audio>'
             if media.audio else '<span class="noaudio">no audio (PyAV missing)</span>')
    said = f'<div class="said"><b>caller</b> <q>{escape(row.user_text) or "<em>(no transcript)</em>"}</q>'
    if row.agent_text:
        said += f' <b>agent</b> <q>{escape(row.agent_text)}</q>'
    if row.heard_text is not None:
        said += f' <b>heard</b> <q>{escape(row.heard_text)}</q>'
    said += "</div>"
    head = (f'<header class="th"><span class="tn">turn {row.turn}</span> <span class="st st-{attr(row.status.replace(" ", "-"))}">'
            f'{escape(row.status)}</span> <span class="tt">{secs(row.t0)} … {secs(row.t1)}</span>{audio}{said}{note}</header>')
    return (f'<article class="turn" id="{attr(side)}-turn-{row.turn}" data-side="{attr(side)}" data-turn="{row.turn}" '
            f'data-turns="{" ".join(map(str, row.turns))}" data-status="{attr(row.status)}" '
            f'data-t0="{row.t0:.3f}" data-t1="{row.t1:.3f}">{head}{lanes(tl, row, media)}</article>')


def _fate(row: TurnRow, turn: int) -> str:
    kinds = {m.kind for m in row.markers if m.turn == turn}
    if "merged" in kinds:
        return "merged into this one"
    if "preemptive-abandon" in kinds:
        return "preemptive, abandoned"
    return "superseded"
