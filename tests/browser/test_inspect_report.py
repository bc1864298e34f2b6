"""`voxbus inspect` on a real call: `voxbus demo` asks three questions over WebRTC and talks over the
last answer; the session is exported (`voxbus record`) and inspected (`voxbus inspect SESSION`), then
the report is checked as a file and in headless Chromium with every request refused, and
`voxbus replay --report` renders the recording next to a replay of it.

One call serves the three tests (module fixture). Expectations come from the recorded events themselves,
read here without the report's own code: one turn row per turn that answered (an abandoned
preemptive turn sits in the row of the turn that went on), one marker per marker event, one job row
per `JobRun`, the barge-in marker where playout was cut.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as sync_redis

from shared.admin.recording import Recording, load
from shared.protocol import (
    AudioFrame,
    Cancelled,
    Interrupt,
    JobDropped,
    JobFailed,
    JobOutcome,
    JobRun,
    Keys,
    OpusFrame,
    TurnMark,
)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
QUESTIONS = ["What is the capital of Germany?", "And how many people live there?",
             "Thanks. Can you spell the name of that city for me?"]
MARK_KINDS = {"preemptive_started": "preemptive-start", "preemptive_abandoned": "preemptive-abandon",
              "preemptive_confirmed": "preemptive-confirm", "end_vad": "endpoint", "end_model": "endpoint",
              "merged": "merged", "false_interruption": "false-interruption"}


def voxbus(*args: str, redis_url: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=dict(os.environ, REDIS_URL=redis_url),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"voxbus {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


@dataclass
class Expected:
    """What the recording says the report must show."""

    turns: set[int]  # every turn id of the session
    rows: list[int]  # the turns that get a row: not abandoned, not merged (or the last one)
    markers: Counter[str]
    jobs: dict[str, str]  # pool/entry/delivery -> worker
    barge_turn: int
    cut_at: float  # seconds from caller frame 0: playout start + what was heard


def expected_of(rec: Recording) -> Expected:
    events = rec.messages("events")
    frames = [m for m in rec.messages("audio.in") if isinstance(m, AudioFrame | OpusFrame)]
    origin = statistics.median(f.ts - f.seq * 0.02 for f in frames)
    turns = {m.turn for kind in ("events", "tokens", "audio.out") for m in rec.messages(kind) if getattr(m, "turn", -1) >= 0}
    passed = {m.turn for m in events if isinstance(m, TurnMark) and m.mark in ("preemptive_abandoned", "merged")}
    rows = sorted((turns - passed) | ({max(turns)} if turns else set()))
    markers: Counter[str] = Counter()
    jobs: dict[str, str] = {}
    starts: dict[int, float] = {}
    barge_turn, cut_at = -1, -1.0
    for m in events:
        if isinstance(m, Interrupt):
            markers["barge-in"] += 1
            barge_turn = m.turn
        elif isinstance(m, Cancelled):
            markers["cancel"] += 1
        elif isinstance(m, JobFailed):
            markers["dead-letter"] += 1
        elif isinstance(m, JobDropped):
            markers["late"] += 1
        elif isinstance(m, JobRun):
            jobs[f"{m.pool}/{m.entry_id}/{m.deliveries}"] = m.worker
            markers["retry"] += m.deliveries > 1
            markers["failure"] += m.outcome == JobOutcome.RETRIED
        elif isinstance(m, TurnMark):
            if m.stage == "playout" and m.mark == "start":
                starts[m.turn] = m.ts - origin
            elif m.stage == "playout" and m.mark == "flushed":
                markers["cut"] += 1
                cut_at = starts[m.turn] + m.value_ms / 1000
            elif m.mark in MARK_KINDS:
                markers[MARK_KINDS[m.mark]] += 1
            elif m.mark.startswith("overflow:"):
                markers["overflow"] += 1
            elif m.mark.startswith("busy_"):
                markers["busy"] += 1
    return Expected(turns, rows, +markers, jobs, barge_turn, cut_at)


@dataclass
class Call:
    sid: str
    rec: Recording
    report: Path
    inspect_output: str
    expected: Expected


@pytest.fixture(scope="module")
def call(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Call]:
    out = tmp_path_factory.mktemp("inspect")
    say = [a for q in QUESTIONS for a in ("--say", q)]
    demo = voxbus("demo", "--json", *say, "--gap", "0.8", "--barge-in-at", "0.8", "--out", str(out / "demo"),
                  redis_url=redis_url, timeout=480)
    sid = json.loads(demo.stdout.strip().splitlines()[-1])["session_id"]
    try:
        voxbus("record", sid, "-o", str(out / "call.vbrec"), redis_url=redis_url)
        shown = voxbus("inspect", sid, "-o", str(out / "report.html"), redis_url=redis_url).stdout
        print(f"\n{shown.strip()}")
        rec = load(out / "call.vbrec")
        yield Call(sid, rec, out / "report.html", shown, expected_of(rec))
    finally:
        client = sync_redis.Redis.from_url(redis_url)
        client.delete(*Keys.session_streams(sid), Keys.ctx(sid), Keys.meta(sid), Keys.cancelled_turn(sid), Keys.claim(sid))
        client.zrem(Keys.SESSIONS, sid)
        client.close()


class Page(HTMLParser):
    """Every element's attributes, with the turn row (article) it sits in."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, Any]]] = []
        self._article: dict[str, Any] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a: dict[str, Any] = dict(attrs)
        if tag == "article":
            self._article = a
        a["_row"] = self._article
        self.elements.append((tag, a))

    def having(self, name: str) -> list[dict[str, Any]]:
        return [a for _, a in self.elements if name in a]


@pytest.mark.timeout(900)
def test_a_real_call_is_inspected(call: Call) -> None:
    ex = call.expected
    assert re.search(r"wrote .*report\.html \(\d+ KiB, audio \d+ KiB of Opus; [\d.]+ s of call", call.inspect_output)
    page = Page(call.report.read_text())
    rows = page.having("data-turns")
    assert [int(r["data-turn"]) for r in rows] == ex.rows
    assert sorted(int(t) for r in rows for t in r["data-turns"].split()) == sorted(ex.turns)
    heard = [r for r in rows if r["data-status"] in ("answered", "interrupted")]
    # The words spoken over the last answer are a turn of their own, whose reply may or may not start
    # before the demo hangs up (2 s later): it is the only row allowed after the barge-in.
    asked = [r for r in heard if int(r["data-turn"]) <= ex.barge_turn]
    assert len(asked) == len(QUESTIONS), [(r["data-turn"], r["data-status"]) for r in rows]
    assert len(heard) - len(asked) <= 1, [(r["data-turn"], r["data-status"]) for r in rows]
    assert [r["data-turn"] for r in rows if r["data-status"] == "interrupted"] == [str(ex.barge_turn)]

    assert Counter(a["data-marker"] for a in page.having("data-marker")) == ex.markers
    barge = [a for a in page.having("data-marker") if a["data-marker"] == "barge-in"]
    assert len(barge) == 1 and int(barge[0]["data-turn"]) == ex.barge_turn
    assert str(ex.barge_turn) in barge[0]["_row"]["data-turns"].split()
    assert float(barge[0]["data-t"]) == pytest.approx(ex.cut_at, abs=0.05)

    jobs = page.having("data-job")
    assert {a["data-job"]: a["data-worker"] for a in jobs} == ex.jobs and len(jobs) == len(ex.jobs)
    assert {a["data-job-bar"] for a in page.having("data-job-bar")} == set(ex.jobs)

    import av

    audio = {a["data-turn"]: a["src"] for t, a in page.elements if t == "audio"}
    for row in asked:
        src = audio[row["data-turn"]]
        assert src.startswith("data:audio/webm;base64,")
        with av.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as box:
            pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in box.decode(box.streams.audio[0])])
            rate = box.streams.audio[0].codec_context.sample_rate
        window = float(row["data-t1"]) - float(row["data-t0"])
        assert len(pcm) / rate == pytest.approx(window, abs=0.25)
        assert np.abs(pcm).max() > (0.05 if pcm.dtype.kind == "f" else 1000), f"turn {row['data-turn']}: silent audio"
    size = call.report.stat().st_size
    call_s = max(float(r["data-t1"]) for r in rows)
    print(f"report {size / 1024:.0f} KiB for a {call_s:.0f} s call ({size / 1024 / (call_s / 60):.0f} KiB a minute)")
    assert size < 2 * 1024 * 1024


COLLECT = """() => ({
  rows: [...document.querySelectorAll('article.turn')].map(a => [Number(a.dataset.turn), a.dataset.turns, a.dataset.status]),
  markers: [...document.querySelectorAll('[data-marker]')].map(m => [m.dataset.marker, Number(m.dataset.turn),
                                                                   Number(m.dataset.t)]),
  jobs: [...document.querySelectorAll('tr.job')].map(j => [j.dataset.job, j.dataset.worker]),
  audio: [...document.querySelectorAll('audio')].map(a => [a.readyState, a.duration, a.error && a.error.code]),
  inked: [...document.querySelectorAll('canvas.w-caller')].map(c => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0; for (let i = 3; i < d.length; i += 4) { if (d[i]) n++; } return n; }),
  report: window.voxbusReport,
})"""

PLAY = """async () => {
  const a = document.querySelector('article.turn audio');
  await a.play();
  await new Promise(r => setTimeout(r, 1500));
  const t = a.currentTime; a.pause(); return t;
}"""


@pytest.mark.browser
@pytest.mark.timeout(900)
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium (apt-get install chromium)")
async def test_the_report_in_headless_chromium_without_network(call: Call, tmp_path: Path) -> None:
    from playwright.async_api import Route, async_playwright

    ex = call.expected
    url = call.report.resolve().as_uri()
    refused: list[str] = []
    requests: list[str] = []
    console: list[str] = []

    async def refuse(route: Route) -> None:
        if route.request.url == url:  # the report itself, from disk
            await route.continue_()
            return
        refused.append(route.request.url)
        await route.abort()

    shots = Path(os.environ.get("VOXBUS_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "inspect-report.png"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"])
        try:
            context = await browser.new_context(viewport={"width": 1500, "height": 1000})
            await context.route("**/*", refuse)
            page = await context.new_page()
            page.on("request", lambda r: requests.append(r.url) if r.url != url and not r.url.startswith("data:") else None)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            await page.goto(url)
            await page.wait_for_function("window.voxbusReport && window.voxbusReport.ready", timeout=30_000)
            await page.wait_for_function("[...document.querySelectorAll('audio')].every(a => a.readyState >= 1)",
                                         timeout=30_000)
            seen = await page.evaluate(COLLECT)
            played = await page.evaluate(PLAY)
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    print(f"\nscreenshot: {shot}")
    if os.environ.get("VOXBUS_TEST_ARTIFACTS"):  # the report beside its picture, to open by hand
        shutil.copy(call.report, shots / "inspect-report.html")

    assert refused == [] and requests == [], (refused, requests)
    assert [r[0] for r in seen["rows"]] == ex.rows
    assert Counter(m[0] for m in seen["markers"]) == ex.markers
    barge = [m for m in seen["markers"] if m[0] == "barge-in"]
    assert len(barge) == 1 and barge[0][1] == ex.barge_turn and barge[0][2] == pytest.approx(ex.cut_at, abs=0.05)
    assert dict(seen["jobs"]) == ex.jobs and len(seen["jobs"]) == len(ex.jobs)
    assert seen["report"]["turns"] == len(ex.rows) and seen["report"]["jobs"] == len(ex.jobs)
    assert seen["audio"] and all(state >= 1 and dur > 0 and err is None for state, dur, err in seen["audio"]), seen["audio"]
    assert all(n > 0 for n in seen["inked"]), "a caller waveform was not drawn"
    assert played > 0.5, f"the audio did not play (currentTime {played})"
    assert not [line for line in console if line.startswith(("error", "pageerror"))], console


@pytest.mark.timeout(900)
def test_replay_report_shows_then_and_now_side_by_side(call: Call, redis_url: str, tmp_path: Path) -> None:
    """`voxbus replay FILE --report`: the recorded run and today's run of the same caller audio, one page."""
    vbrec, out = call.report.parent / "call.vbrec", tmp_path / "replay.html"
    proc = voxbus("replay", str(vbrec), "--start-workers", "--report", str(out), "--json", redis_url=redis_url, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        print(f"\n{result['report']['summary']}")
        assert result["speed"] == "1" and result["report"]["path"] == str(out)
        page = Page(out.read_text())
        rows = page.having("data-turns")
        then = [int(r["data-turn"]) for r in rows if r["data-side"] == "then"]
        now = [r for r in rows if r["data-side"] == "now"]
        assert then == call.expected.rows
        assert len([r for r in now if r["data-status"] in ("answered", "interrupted")]) >= len(QUESTIONS) - 1, now
        assert [a["data-side"] for t, a in page.elements if t == "table" and a.get("class") == "jobs"] == ["then", "now"]
        now_jobs = len(page.having("data-job")) - len(call.expected.jobs)  # the then table is the recording's
        assert now_jobs >= len(QUESTIONS) * 3, now_jobs  # at least ASR, LLM and TTS for each question
    finally:
        sid = result["replay_session"]
        client = sync_redis.Redis.from_url(redis_url)
        client.delete(*Keys.session_streams(sid), Keys.ctx(sid), Keys.meta(sid), Keys.cancelled_turn(sid), Keys.claim(sid))
        client.zrem(Keys.SESSIONS, sid)
        client.close()
