"""`voxbus inspect` on a synthetic recording: the timeline model, the tracks, the page, the file size.

The call is built message by message, so every expectation is known in advance:
turn 0 is answered (with a false interruption while it plays); turn 1 is a
preemptive turn abandoned when the caller went on, so its events sit in the row
of turn 2, which answers after a failed and retried LLM job, an overflowed TTS
job and an end-of-turn job dead-lettered on its third try, and is cut by a barge-in 300 ms into
its reply.
"""

from __future__ import annotations

import base64
import io
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import msgspec
import numpy as np
import pytest

from shared.admin.inspect import make_side, write_report
from shared.admin.inspect_audio import RATE, caller_pcm, encode_opus, peaks, resample
from shared.admin.inspect_html import render
from shared.admin.inspect_timeline import build
from shared.admin.recording import FORMAT, Recording
from shared.protocol import (
    AudioFrame,
    AudioOut,
    Cancelled,
    ChatMessage,
    EotDecision,
    Interrupt,
    JobDropped,
    JobFailed,
    JobOutcome,
    JobRun,
    Message,
    OpusFrame,
    SpeechEnd,
    SpeechPause,
    SpeechStart,
    TokenChunk,
    Transcript,
    TurnMark,
    encode,
)

T = 1_000_000.0  # wall clock of caller frame 0
SID = "syn-call"
STREAM = {AudioFrame: "audio.in", OpusFrame: "audio.in", TokenChunk: "tokens", AudioOut: "audio.out"}


class Call:
    """A recording under construction; times in seconds from caller frame 0."""

    def __init__(self, sid: str = SID, origin: float = T) -> None:
        self.sid, self.origin = sid, origin
        self.streams: dict[str, list[tuple[str, bytes]]] = {k: [] for k in ("audio.in", "events", "tokens", "audio.out")}
        self.ctx: list[bytes] = []

    def add(self, at: float, msg_type: type[Message], **fields: object) -> None:
        msg = msg_type(session=self.sid, ts=self.origin + at, **fields)
        entries = self.streams[STREAM.get(msg_type, "events")]
        entries.append((f"{len(entries) + 1}-0", encode(msg)))

    def frames(self, seconds: float, voiced: list[tuple[float, float]]) -> None:
        t = np.arange(320) / RATE
        for seq in range(int(seconds / 0.02)):
            on = any(a <= seq * 0.02 < b for a, b in voiced)
            pcm = (np.sin(2 * np.pi * 220 * (t + seq * 0.02)) * 8000 * on).astype("<i2")
            self.add(seq * 0.02 + 0.004 * (seq % 3), AudioFrame, seq=seq, pcm=pcm.tobytes())  # capture jitter

    def job(self, turn: int, stage: str, queued: float, started: float, ended: float, outcome: JobOutcome = JobOutcome.DONE,
            deliveries: int = 1, pool: str = "", entry: str = "", reason: str = "") -> None:
        pool = pool or f"{stage}-cpu"
        self.add(ended, JobRun, turn=turn, stage=stage, pool=pool, gpu_type="cpu", worker=f"{pool}-w1",
                 entry_id=entry or f"{int(queued * 1000)}-0", queued=T + queued, started=T + started, ended=T + ended,
                 outcome=outcome, deliveries=deliveries, reason=reason)

    def speech(self, turn: int, at: float, rate: int, seconds: float, text: str) -> None:
        n = int(rate * seconds / 2)
        for seq in range(2):
            pcm = (np.sin(2 * np.pi * 330 * np.arange(n) / rate) * 9000).astype("<i2").tobytes()
            self.add(at, AudioOut, turn=turn, seq=seq, pcm=pcm, rate=rate, text=text if seq == 0 else "")
        self.add(at, AudioOut, turn=turn, seq=2, pcm=b"", rate=rate, final=True)

    def recording(self) -> Recording:
        return Recording(format=FORMAT, session=self.sid, exported_at=self.origin + 60, ctx=self.ctx, streams=self.streams)


def synthetic_call() -> Recording:
    c = Call()
    c.frames(9.0, voiced=[(0.5, 2.0), (5.0, 6.0)])
    # turn 0: a preemptive turn confirmed by the end-of-turn model, answered
    c.add(0.7, SpeechStart, frame=25, prob=0.99)
    c.add(2.15, SpeechPause, start_frame=25, end_frame=99)
    c.add(2.16, TurnMark, turn=0, stage="turn", mark="preemptive_started")
    c.job(0, "eot", 2.16, 2.17, 2.4)
    c.add(1.5, Transcript, turn=0, text="what is", final=False, start_seq=25, end_seq=70)
    c.add(2.4, EotDecision, turn=0, prob=0.93, start_frame=0, end_frame=99, cost_ms=220)
    c.add(2.42, TurnMark, turn=0, stage="turn", mark="end_model", value_ms=300)
    c.add(2.42, TurnMark, turn=0, stage="turn", mark="preemptive_confirmed")
    c.add(2.5, Transcript, turn=0, text="What is the capital of France?", start_seq=25, end_seq=99, asr_ms=200)
    c.job(0, "asr", 2.16, 2.3, 2.5)
    c.add(2.7, TurnMark, turn=0, stage="llm", mark="ttft", value_ms=150)
    for i, word in enumerate(["Paris", " is", " the", " capital", "."]):
        c.add(2.7 + 0.05 * i, TokenChunk, turn=0, seq=i, text=word)
    c.job(0, "llm", 2.5, 2.55, 3.0)
    c.speech(0, 3.0, 22_050, 1.0, "Paris is the capital.")
    c.add(3.0, TurnMark, turn=0, stage="tts", mark="first_audio", value_ms=250)
    c.job(0, "tts", 2.5, 2.52, 3.1)
    c.add(3.1, TurnMark, turn=0, stage="playout", mark="start", value_ms=20)
    c.add(3.6, TurnMark, turn=0, stage="bridge", mark="false_interruption")
    c.add(4.1, TurnMark, turn=0, stage="playout", mark="end", value_ms=1000)
    # turn 1: preemptive at a pause, abandoned when the caller went on
    c.add(5.0, SpeechStart, frame=250, prob=0.98)
    c.add(5.5, SpeechPause, start_frame=250, end_frame=269)
    c.add(5.5, TurnMark, turn=1, stage="turn", mark="preemptive_started")
    c.add(5.65, SpeechPause, start_frame=250, end_frame=269, resumed=True)
    c.add(5.65, TurnMark, turn=1, stage="turn", mark="preemptive_abandoned")
    c.add(5.7, Cancelled, turn=1, stage="asr", reason="speculation: the caller spoke again")
    c.job(1, "asr", 5.5, 5.51, 5.7, JobOutcome.CANCELLED)
    # turn 2: ended by the VAD; LLM retried, TTS overflowed, EOT dead-lettered; cut by a barge-in
    c.add(6.7, SpeechEnd, start_frame=250, end_frame=299, silence_ms=700)
    c.add(6.7, TurnMark, turn=2, stage="turn", mark="end_vad", value_ms=700)
    c.add(6.8, Transcript, turn=2, text="Tell me more.", start_seq=250, end_seq=299, asr_ms=90)
    c.job(2, "asr", 6.7, 6.71, 6.8)
    c.job(2, "eot", 6.0, 6.1, 6.2, JobOutcome.DEAD_LETTERED, deliveries=3, reason="RuntimeError: boom")
    c.add(6.2, JobFailed, turn=2, stage="eot", reason="RuntimeError: boom")
    c.add(6.25, JobDropped, turn=2, stage="eot", late_ms=500, pool="eot-cpu")
    c.job(2, "llm", 6.8, 6.81, 6.9, JobOutcome.RETRIED, entry="6800-0", reason="RuntimeError: engine")
    c.job(2, "llm", 6.8, 6.95, 7.3, deliveries=2, entry="6800-0")
    c.add(6.8, TurnMark, turn=2, stage="tts", mark="overflow:tts-gpu->tts-cpu")
    c.add(7.0, TokenChunk, turn=2, seq=0, text="Sure")
    c.speech(2, 7.0, 24_000, 1.0, "Sure, it is lovely.")
    c.add(7.1, TurnMark, turn=2, stage="playout", mark="start", value_ms=20)
    c.add(7.39, Interrupt, source="client", turn=2)
    c.add(7.4, TurnMark, turn=2, stage="playout", mark="flushed", value_ms=300)
    c.add(7.45, Cancelled, turn=2, stage="tts", reason="barge-in")
    c.job(2, "tts", 6.8, 6.82, 7.45, JobOutcome.CANCELLED, pool="tts-cpu")
    c.add(8.5, Interrupt, source="vad")  # no turn: placed in the row running at its time
    c.ctx.append(encode(ChatMessage(session=SID, role="assistant", text="Sure", turn=2, interrupted=True)))
    return c.recording()


EXPECTED_MARKERS = {"preemptive-start": 2, "preemptive-confirm": 1, "preemptive-abandon": 1, "endpoint": 2,
                    "false-interruption": 1, "cancel": 2, "barge-in": 2, "cut": 1, "retry": 2, "failure": 1,
                    "dead-letter": 1, "late": 1, "overflow": 1}


@pytest.fixture(scope="module")
def rec() -> Recording:
    return synthetic_call()


def test_caller_audio_is_one_track_on_the_frame_clock(rec: Recording) -> None:
    caller = caller_pcm(rec)
    assert caller.origin == pytest.approx(T, abs=0.005) and caller.realtime
    assert len(caller.pcm) == 450 * 320
    voiced = np.abs(caller.pcm.astype(np.int32)).reshape(-1, 320).max(axis=1) > 1000
    assert voiced[25:100].all() and not voiced[:25].any() and not voiced[100:250].any() and voiced[250:300].all()


def test_caller_audio_kept_as_opus_is_decoded() -> None:
    pytest.importorskip("av")
    from shared.opus import OpusEncoder

    c = Call("opus-call")
    enc = OpusEncoder()
    tone = (np.sin(2 * np.pi * 300 * np.arange(320 * 100) / RATE) * 8000).astype(np.int16)
    for seq in range(100):  # 2 s: 1 s of tone, 1 s of silence
        pcm = tone[seq * 320:(seq + 1) * 320] if seq < 50 else np.zeros(320, dtype=np.int16)
        c.add(seq * 0.02, OpusFrame, seq=seq, opus=enc.encode(pcm))
    caller = caller_pcm(c.recording())
    assert caller.origin == pytest.approx(T) and len(caller.pcm) == 100 * 320
    level = np.abs(caller.pcm.astype(np.int32)).reshape(-1, 320).max(axis=1)
    assert (level[5:45] > 4000).all() and (level[60:] < 500).all()


def test_fast_replay_is_flagged_not_realtime() -> None:
    c = Call("fast")
    for seq in range(500):  # 10 s of frames pushed in 1 s
        c.add(seq * 0.002, AudioFrame, seq=seq, pcm=bytes(640))
    assert not caller_pcm(c.recording()).realtime
    assert make_side("now", c.recording(), with_audio=False).timeline.notes


def test_turn_rows_chain_an_abandoned_turn_into_the_next(rec: Recording) -> None:
    tl = build(rec, T)
    assert [(r.turn, r.turns, r.status) for r in tl.rows] == [(0, [0], "answered"), (2, [1, 2], "interrupted")]
    first, second = tl.rows
    assert first.user_text == "What is the capital of France?" and first.agent_text == "Paris is the capital."
    assert second.user_text == "Tell me more." and second.heard_text == "Sure"
    assert [p.kind for p in first.asr] == ["partial", "final"]
    assert [p.label for p in first.eot] == ["0.93"]
    assert [p.label for p in first.tokens] == ["Paris", " is", " the", " capital", "."]
    assert first.t0 < 0.5 < 4.1 < first.t1  # from the first voiced frame to the end of playout
    assert second.t0 <= 5.0 and second.t1 >= 8.5


def test_every_event_is_one_marker_in_its_row(rec: Recording) -> None:
    tl = build(rec, T)
    assert Counter(m.kind for m in tl.markers) == EXPECTED_MARKERS
    by_row = {r.turn: Counter(m.kind for m in r.markers) for r in tl.rows}
    assert by_row[0] == {"preemptive-start": 1, "preemptive-confirm": 1, "endpoint": 1, "false-interruption": 1}
    for m in tl.markers:
        row = next(r for r in tl.rows if m in r.markers)
        assert row.t0 <= m.t <= row.t1


def test_barge_in_sits_where_playout_was_cut(rec: Recording) -> None:
    tl = build(rec, T)
    play = tl.playouts[2]
    assert play.flushed and play.heard_ms == 300 and play.start == pytest.approx(7.1)
    barge = next(m for m in tl.markers if m.kind == "barge-in" and m.turn == 2)
    cut = next(m for m in tl.markers if m.kind == "cut")
    assert barge.t == pytest.approx(7.4) and cut.t == pytest.approx(7.4)
    assert tl.playouts[0].heard_ms == 1000 and not tl.playouts[0].flushed


def test_jobs_keep_pool_worker_times_and_every_delivery(rec: Recording) -> None:
    tl = build(rec, T)
    assert len(tl.jobs) == 10 and len({j.key for j in tl.jobs}) == 10
    retried = [j for j in tl.jobs if j.entry_id == "6800-0" and j.stage == "llm"]  # the TTS job has that id too
    assert [(j.outcome, j.deliveries) for j in retried] == [("retried", 1), ("done", 2)]
    asr = next(j for j in tl.jobs if j.turn == 0 and j.stage == "asr")
    assert (asr.pool, asr.gpu_type, asr.worker) == ("asr-cpu", "cpu", "asr-cpu-w1")
    assert asr.wait_ms == pytest.approx(140, abs=0.5) and asr.run_ms == pytest.approx(200, abs=0.5)
    assert len(tl.rows[0].jobs) == 4 and sorted(j.turn for j in tl.rows[1].jobs) == [1, 2, 2, 2, 2, 2]


def test_waterfall_uses_the_live_names_and_totals_add_up(rec: Recording) -> None:
    tl = build(rec, T)
    w = tl.rows[0].waterfall
    assert (w["endpoint_ms"], w["endpoint_by"], w["eot_prob"], w["asr_ms"], w["llm_ttft_ms"]) == (300, "model", 0.93, 200, 150)
    assert w["response_ms"] == pytest.approx(680, abs=1) and w["voice_to_voice_ms"] == pytest.approx(1100, abs=1)
    assert tl.rows[1].waterfall["endpoint_by"] == "vad"
    t = tl.totals
    assert (t["turns"], t["answered"], t["jobs"], t["workers"]) == (2, 2, 10, 4)
    assert t["job_outcomes"] == {"done": 6, "cancelled": 2, "retried": 1, "dead_lettered": 1}
    assert t["agent_heard_s"] == pytest.approx(1.3)


def test_tts_chunks_are_laid_end_to_end(rec: Recording) -> None:
    spans = build(rec, T).rows[0].tts
    assert [round(s.t0, 3) for s in spans] == [3.0, 3.5] and spans[0].label == "Paris is the capital."


def test_agent_track_is_what_the_caller_heard(rec: Recording) -> None:
    side = make_side("session", rec, with_audio=False)
    from shared.admin.inspect_audio import tracks

    tr = tracks(rec, side.timeline, caller_pcm(rec).pcm)
    loud = np.abs(tr.agent.astype(np.int32)) > 500
    at = lambda s: int(s * RATE)  # noqa: E731
    assert loud[at(3.15):at(4.05)].mean() > 0.9 and not loud[at(4.15):at(7.05)].any()
    assert loud[at(7.15):at(7.38)].mean() > 0.9 and not loud[at(7.42):].any()  # cut 300 ms in


def test_resample_and_peaks() -> None:
    tone = (np.sin(2 * np.pi * 440 * np.arange(22_050) / 22_050) * 10_000).astype(np.int16)
    out = resample(tone, 22_050)
    assert len(out) == RATE and abs(int(np.abs(out).max()) - 10_000) < 200
    pk = np.frombuffer(peaks(out, 100, 10_000.0), dtype=np.int8).reshape(100, 2)
    assert (pk[:, 0] < -120).all() and (pk[:, 1] > 120).all()
    assert len(peaks(np.zeros(10, dtype=np.int16), 100, 1.0)) == 20


def test_opus_roundtrip() -> None:
    av = pytest.importorskip("av")
    pcm = (np.sin(2 * np.pi * 300 * np.arange(RATE * 2) / RATE) * 8000).astype(np.int16)
    data = encode_opus(pcm)
    with av.open(io.BytesIO(data)) as box:
        stream = box.streams.audio[0]
        assert stream.codec_context.name in ("opus", "libopus")
        decoded = sum(f.samples for f in box.decode(stream)) / stream.codec_context.sample_rate
    assert decoded == pytest.approx(2.0, abs=0.1) and len(data) < 2 * 16_000 / 8 + 2048


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))

    def having(self, name: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.found if name in a]


def test_page_counts_match_and_reference_nothing_outside(rec: Recording, tmp_path: Path) -> None:
    report = write_report([("session", rec)], tmp_path / "r.html")
    html = report.path.read_text()
    doc = Elements()
    doc.feed(html)
    assert [a["data-turn"] for a in doc.having("data-turns")] == ["0", "2"]
    assert Counter(a["data-marker"] for a in doc.having("data-marker")) == EXPECTED_MARKERS
    jobs = doc.having("data-job")
    assert len(jobs) == 10 and all(a["data-worker"] for a in jobs)
    assert {a["data-job"] for a in jobs} == {a["data-job-bar"] for a in doc.having("data-job-bar")}
    audio = [a for t, a in doc.found if t == "audio"]
    if report.audio_bytes:
        assert len(audio) == 2 and all((a["src"] or "").startswith("data:audio/webm;base64,") for a in audio)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    no_data = re.sub(r'data:[a-z/]+;base64,[A-Za-z0-9+/=]+', "", html)
    assert not re.search(r'(src|href)="(?!#)[^"]', no_data), "a reference outside the page"
    assert not re.search(r"https?://|url\(|@import", no_data)


def test_then_and_now_side_by_side(rec: Recording) -> None:
    other = msgspec.structs.replace(rec, session="syn-replay")
    html = render([make_side("then", rec, with_audio=False), make_side("now", other, with_audio=False)], "replay")
    doc = Elements()
    doc.feed(html)
    assert Counter(a["data-side"] for a in doc.having("data-turns")) == {"then": 2, "now": 2}
    assert html.count('class="pair n2"') == 2
    tables = [a for t, a in doc.found if t == "table" and a.get("class") == "jobs"]
    assert [a["data-side"] for a in tables] == ["then", "now"]


def test_a_five_minute_call_stays_under_two_megabytes(tmp_path: Path) -> None:
    """Turns of 10 s with speech in both directions for 5 minutes: the report, audio included."""
    pytest.importorskip("av")
    c = Call("long-call")
    rng = np.random.default_rng(7)
    turns = 30
    for seq in range(turns * 500):  # 10 s a turn: 2 s of caller speech, 4 s of agent reply
        voiced = (seq % 500) < 100
        pcm = (rng.normal(0, 3000, 320) * voiced).astype("<i2")
        c.add(seq * 0.02, AudioFrame, seq=seq, pcm=pcm.tobytes())
    for turn in range(turns):
        t0 = turn * 10.0
        c.add(t0 + 0.1, SpeechStart, frame=turn * 500)
        c.add(t0 + 2.5, SpeechEnd, start_frame=turn * 500, end_frame=turn * 500 + 99, silence_ms=500)
        c.add(t0 + 2.5, TurnMark, turn=turn, stage="turn", mark="end_vad", value_ms=500)
        c.add(t0 + 2.7, Transcript, turn=turn, text="a question of some length, as callers ask them", start_seq=turn * 500,
              end_seq=turn * 500 + 99, asr_ms=150)
        for i in range(40):
            c.add(t0 + 2.8 + i * 0.03, TokenChunk, turn=turn, seq=i, text=" word")
        for stage in ("asr", "llm", "tts"):
            c.job(turn, stage, t0 + 2.5, t0 + 2.51, t0 + 4.0, entry=f"{turn}-{stage}")
        pcm = (rng.normal(0, 3000, 22_050 * 4)).astype("<i2").tobytes()
        for seq in range(10):
            c.add(t0 + 3.0, AudioOut, turn=turn, seq=seq, pcm=pcm[seq * 17_640:(seq + 1) * 17_640], rate=22_050,
                  text="A clause." if seq % 3 == 0 else "")
        c.add(t0 + 3.1, TurnMark, turn=turn, stage="playout", mark="start", value_ms=20)
        c.add(t0 + 7.1, TurnMark, turn=turn, stage="playout", mark="end", value_ms=4000)
    report = write_report([("session", c.recording())], tmp_path / "long.html")
    print(f"\n{report.summary()}")
    assert report.duration_s >= 300 and report.turns == turns
    assert report.size < 2 * 1024 * 1024, report.summary()
    assert base64.b64decode(re.findall(r"base64,([A-Za-z0-9+/=]+)", report.path.read_text())[0])[:4] == b"\x1aE\xdf\xa3"
