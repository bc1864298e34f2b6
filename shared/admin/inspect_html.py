"""`voxbus inspect`, the page: one self-contained HTML file for one session, or two side by side.

The page template (`inspect_page.html`, package data) holds the styles and the
script inline; this module fills in the body: the session totals, a row per
turn (`inspect_rows`), the latency waterfall per turn and the jobs table. Its
Content-Security-Policy forbids every fetch, so the file works (and can only
work) offline: audio comes as data: URIs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape
from importlib import resources
from typing import Any

from .inspect_audio import RowMedia
from .inspect_model import MARKER_KINDS, Timeline, TurnRow
from .inspect_rows import MARKER_LABELS, attr, secs, turn_html
from .inspect_waterfall import WATERFALL_KEYS

TEMPLATE = "inspect_page.html"
COLUMNS = dict(zip(WATERFALL_KEYS, ("endpoint", "ASR", "LLM first token", "TTS first clause", "TTS first audio",
                                     "response", "voice to voice")))


@dataclass(frozen=True, slots=True)
class Side:
    name: str  # "session", or "then" / "now" for a replay
    timeline: Timeline
    media: list[RowMedia]  # one per row


def render(sides: list[Side], title: str) -> str:
    page = resources.files("shared.admin").joinpath(TEMPLATE).read_text(encoding="utf-8")
    body = "".join([_header(sides, title), _legend(), _section("totals", "Session totals", sides, _totals),
                    _turns(sides), _section("waterfall", "Latency per turn", sides, _waterfall),
                    _section("jobs", "Jobs", sides, _jobs)])
    return page.replace("<!--@TITLE@-->", escape(title)).replace("<!--@BODY@-->", body)


def _header(sides: list[Side], title: str) -> str:
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    info = []
    for s in sides:
        tl = s.timeline
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(tl.origin))
        who = f"{escape(s.name)}: " if len(sides) > 1 else ""
        info.append(f'<div class="sess" data-side="{attr(s.name)}">{who}session <code>{escape(tl.session)}</code> '
                    f'({escape(tl.transport or "?")}), started {started}, {tl.duration:.1f} s, {len(tl.rows)} turns, '
                    f'{len(tl.jobs)} jobs</div>' + "".join(f'<div class="warn">{escape(n)}</div>' for n in tl.notes))
    return (f'<header class="top"><h1>{escape(title)}</h1>{"".join(info)}<div class="made">made {made} by '
            "<code>voxbus inspect</code>; times are seconds from the first caller frame. Click a row to play from there."
            "</div></header>")


def _legend() -> str:
    items = "".join(f'<li><span class="mk k-{k} static">{MARKER_LABELS[k]}</span> {escape(v)}</li>'
                    for k, v in MARKER_KINDS.items())
    lanes = ("<li><i class='sw vad'></i> caller speech (VAD) <i class='sw gap'></i> pause</li>"
             "<li><i class='sw heard'></i> agent audio the caller heard; <i class='sw cut'></i> where a barge-in cut it</li>"
             "<li><i class='sw jw'></i> job waiting in its queue <i class='sw jr'></i> job running "
             "(<i class='sw o-cancelled'></i> cancelled, <i class='sw o-failed'></i> failed or dropped)</li>"
             "<li>TTS chunks are laid end to end from when each was published: how far the audio ran ahead of playout</li>")
    return f'<details class="legend"><summary>Legend</summary><ul class="lanes">{lanes}</ul><ul>{items}</ul></details>'


def _section(sid: str, title: str, sides: list[Side], part: Any) -> str:
    cols = "".join(f'<div class="side" data-side="{attr(s.name)}">'
                   + (f"<h3>{escape(s.name)}</h3>" if len(sides) > 1 else "") + part(s) + "</div>" for s in sides)
    return f'<section id="{sid}"><h2>{title}</h2><div class="sides n{len(sides)}">{cols}</div></section>'


def _turns(sides: list[Side]) -> str:
    rows = []
    for i in range(max(len(s.timeline.rows) for s in sides)):
        cells = []
        for s in sides:
            rs = s.timeline.rows
            cells.append(turn_html(s.name, s.timeline, rs[i], s.media[i]) if i < len(rs)
                         else f'<div class="turn missing" data-side="{attr(s.name)}">no turn {i + 1}</div>')
        rows.append(f'<div class="pair n{len(sides)}">{"".join(cells)}</div>')
    empty = "" if any(s.timeline.rows for s in sides) else "<p>No turns: nobody was heard in this session.</p>"
    return f'<section id="turns"><h2>Turns</h2>{empty}{"".join(rows)}</section>'


def _totals(s: Side) -> str:
    t = s.timeline.totals
    marks = ", ".join(f"{v} {escape(k)}" for k, v in t["markers"].items()) or "none"
    outcomes = ", ".join(f"{v} {escape(k)}" for k, v in t["job_outcomes"].items()) or "none"
    cells = [("duration", f"{t['duration_s']} s"), ("turns", f"{t['turns']} ({t['answered']} answered)"),
             ("caller speech", f"{t['caller_speech_s']} s"), ("agent heard", f"{t['agent_heard_s']} s"),
             ("jobs", f"{t['jobs']}: {outcomes}"), ("pools", escape(", ".join(t["pools"])) or "none"),
             ("workers", str(t["workers"])), ("markers", marks)]
    for key, label in COLUMNS.items():
        st = t["waterfall"].get(key)
        if st:
            cells.append((label, f"median {st['median']:.0f} ms, max {st['max']:.0f} ms over {st['n']}"))
    return ('<dl class="totals">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in cells) + "</dl>")


def _ms(v: Any) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else ""


def _bar(row: TurnRow, scale_ms: float) -> str:
    """The turn's critical path from the caller's last voiced sound, on one scale for every turn."""
    w = row.waterfall
    if "speech_end_ts" not in w:
        return ""
    zero = w["speech_end_ts"]
    segs: list[tuple[str, float, float, str]] = []
    if "endpoint_ts" in w:
        segs.append(("endpoint", zero, w["endpoint_ts"], f"silence waited: {w.get('endpoint_ms', 0):.0f} ms"))
    jobs = {j.stage: j for j in row.jobs if j.turn == row.turn and j.outcome == "done"}
    if "asr" in jobs:
        segs.append(("asr", jobs["asr"].started, jobs["asr"].ended, f"ASR job {jobs['asr'].run_ms:.0f} ms"))
    if "llm" in jobs and "llm_ttft_ms" in w:
        start = jobs["llm"].started
        segs.append(("llm", start, start + w["llm_ttft_ms"] / 1000, f"LLM first token {w['llm_ttft_ms']:.0f} ms"))
    if "tts" in jobs and "tts_first_audio_ms" in w:
        ready = jobs["tts"].started + w.get("tts_first_clause_ms", 0) / 1000
        segs.append(("tts", ready, ready + w["tts_first_audio_ms"] / 1000, f"TTS first audio {w['tts_first_audio_ms']:.0f} ms"))
    if "first_audio_ts" in w:
        segs.append(("play", w["first_audio_ts"], w["first_audio_ts"] + 0.04, f"first agent audio at {secs(w['first_audio_ts'])}"))

    def pos(t: float) -> float:
        return round(max(0.0, float(t - zero) * 1000 / scale_ms * 100), 2)
    parts = "".join(f'<i class="wf wf-{k}" style="left:{pos(a)}%;width:{max(0.3, pos(b) - pos(a))}%" title="{attr(tt)}"></i>'
                    for k, a, b, tt in segs)
    return f'<div class="wfbar">{parts}</div>'


def _waterfall(s: Side) -> str:
    rows = s.timeline.rows
    scale = max([1.0, *(r.waterfall.get("voice_to_voice_ms", 0.0) for r in rows),
                 *(((r.waterfall.get("endpoint_ts", 0.0) - r.waterfall.get("speech_end_ts", 0.0)) * 1000) for r in rows)])
    head = "".join(f"<th>{v} ms</th>" for v in COLUMNS.values())
    body = []
    for r in rows:
        w = r.waterfall
        by = f" ({escape(w['endpoint_by'])}" + (f", P={w['eot_prob']:.2f})" if w.get("eot_prob") is not None else ")") \
            if "endpoint_by" in w else ""
        cells = "".join(f"<td>{_ms(w.get(k))}{by if k == 'endpoint_ms' else ''}</td>" for k in COLUMNS)
        body.append(f'<tr class="wfrow" data-turn="{r.turn}"><td><a href="#{attr(s.name)}-turn-{r.turn}">{r.turn}</a></td>'
                    f"{cells}<td>{_ms(w.get('heard_ms'))}</td><td class='barcell'>{_bar(r, scale)}</td></tr>")
    for stat in ("median", "max"):
        cells = "".join(f"<td>{_ms(s.timeline.totals['waterfall'].get(k, {}).get(stat))}</td>" for k in COLUMNS)
        body.append(f'<tr class="stat"><td>{stat}</td>{cells}<td></td><td></td></tr>')
    return (f'<table class="wftable"><thead><tr><th>turn</th>{head}<th>heard ms</th><th>from the last voiced sound: '
            f'endpoint · <span class="k asr">ASR</span> · <span class="k llm">LLM</span> · <span class="k tts">TTS</span> '
            f'· first audio ({scale:.0f} ms full width)</th></tr></thead><tbody>{"".join(body)}</tbody></table>'
            '<p class="fine">Measured at the bridge, like the live waterfall: response = turn end decided → first agent '
            "frame sent; voice to voice = last voiced caller frame → first agent frame sent (the caller's network adds its "
            "own delay).</p>")


def _jobs(s: Side) -> str:
    head = ("<tr><th>turn</th><th>stage</th><th>pool</th><th>GPU</th><th>worker</th><th>entry</th><th>queued</th>"
            "<th>wait ms</th><th>run ms</th><th>outcome</th><th>try</th></tr>")
    body = []
    for j in s.timeline.jobs:
        body.append(
            f'<tr class="job o-{attr(j.outcome)}" data-job="{attr(j.key)}" data-turn="{j.turn}" data-stage="{attr(j.stage)}" '
            f'data-pool="{attr(j.pool)}" data-worker="{attr(j.worker)}" data-outcome="{attr(j.outcome)}" '
            f'data-entry="{attr(j.entry_id)}" data-deliveries="{j.deliveries}" title="{attr(j.reason)}">'
            f"<td>{j.turn}</td><td>{escape(j.stage)}</td><td>{escape(j.pool)}</td><td>{escape(j.gpu_type)}</td>"
            f"<td><code>{escape(j.worker)}</code></td><td><code>{escape(j.entry_id)}</code></td><td>{secs(j.queued)}</td>"
            f"<td>{j.wait_ms:.1f}</td><td>{j.run_ms:.0f}</td><td>{escape(j.outcome)}</td><td>{j.deliveries}</td></tr>")
    if not body:
        body.append('<tr><td colspan="11">no job of this session reported how it ran</td></tr>')
    return f'<table class="jobs" data-side="{attr(s.name)}"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
