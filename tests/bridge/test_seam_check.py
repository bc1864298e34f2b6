"""The seam checker (bridge/seam_check.py) and the playout figures it reads (bridge/playout.py).

Synthetic audio only: a speech-like signal split into two pieces, joined cleanly, then with an
injected gap and an injected step; the checker must pass the first and catch both others. Then
the playout itself: underruns counted per turn, the framer's last samples sent before a gap, and
the joins found again in a recording of what it sent.
"""

from __future__ import annotations

import numpy as np
import pytest

from bridge.playout import Playout, Underrun
from bridge.seam_check import (
    MAX_CLICK,
    MAX_GAP_MS,
    check_joins,
    check_turn,
    locate_joins,
    reference_diff,
    summary,
)
from shared.protocol import AudioOut

RATE = 48_000


def ns(ms: float, rate: int = RATE) -> int:
    return round(rate * ms / 1000)


def speech(ms: int, seed: int = 1, rate: int = RATE) -> np.ndarray:
    """Voiced syllables: a 140 Hz buzz through a few formants, 4 syllables a second, onsets and all."""
    t = np.arange(ns(ms, rate)) / rate
    rng = np.random.default_rng(seed)
    buzz = sum((1.0 / k) * np.sin(2 * np.pi * 140 * k * t + rng.uniform(0, 6)) for k in range(1, 25))
    envelope = np.clip(np.sin(np.pi * 4 * t + rng.uniform(0, 1)), 0, None) ** 0.5
    x = buzz * (0.3 + 0.7 * envelope)
    x *= 9000 / np.abs(x).max()
    fade = np.minimum(1, np.minimum(np.arange(len(x)), np.arange(len(x))[::-1]) / ns(2, rate))
    return (x * fade).astype(np.int16)


def quiet(ms: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(ns(ms, rate), np.int16)


def clean_join(gap_ms: float = 20.0) -> tuple[np.ndarray, int]:
    a, b = speech(900, 1), speech(700, 2)
    x = np.concatenate([quiet(300), a, quiet(gap_ms / 2), quiet(gap_ms / 2), b, quiet(300)])
    return x, 300 * 48 + len(a) + ns(gap_ms / 2)


def test_a_clean_join_passes() -> None:
    x, at = clean_join()
    seam = check_joins(x, RATE, [at], [0.0])[0]
    assert seam.silence_ms == pytest.approx(20, abs=3)
    assert seam.click < 1.0 and seam.ok


def test_an_injected_gap_fails_and_a_pause_the_text_asked_for_does_not() -> None:
    x, at = clean_join(gap_ms=140)
    seam = check_joins(x, RATE, [at], [0.0])[0]
    assert seam.gap_ms == pytest.approx(140, abs=3) and seam.gap_ms > MAX_GAP_MS and not seam.ok
    assert check_joins(x, RATE, [at], [100.0])[0].gap_ms == pytest.approx(40, abs=3)  # still 40 ms too long
    assert check_joins(x, RATE, [at], [120.0])[0].ok


def test_an_injected_step_fails() -> None:
    a, b = speech(900, 1), speech(700, 2)
    loudest = ns(300) + int(np.argmax(np.abs(a[ns(300): ns(600)].astype(np.int32))))
    cut = a[: loudest + 1]  # a piece cut off mid-syllable: the wave drops to zero in one sample
    assert abs(int(cut[-1])) > 3000
    x = np.concatenate([quiet(300), cut, quiet(20), b, quiet(300)])
    at = ns(300) + len(cut) + ns(10)
    seam = check_joins(x, RATE, [at], [0.0])[0]
    assert seam.click > MAX_CLICK and not seam.ok
    assert seam.gap_ms <= MAX_GAP_MS  # a click, not a gap


def test_a_frame_of_silence_dropped_into_speech_is_a_click() -> None:
    x = np.concatenate([quiet(300), speech(1500, 3), quiet(300)])
    at = ns(300) + ns(650)
    x[at: at + 960] = 0
    seam = check_joins(x, RATE, [at], [0.0])[0]
    assert seam.click > MAX_CLICK


def test_speech_alone_scores_under_the_click_limit_everywhere() -> None:
    x = np.concatenate([quiet(100), speech(3000, 4), quiet(100)])
    ref = reference_diff(x, RATE)
    places = list(range(ns(120), len(x) - ns(120), ns(7)))
    seams = check_joins(x, RATE, places, [0.0] * len(places), ref)
    assert max(s.click for s in seams) < MAX_CLICK


def test_locate_joins_counts_the_silent_frames_sent_before_a_piece() -> None:
    starts = [0, 960 * 10 + 300, 960 * 30]
    assert locate_joins(1000, starts, []) == [1000 + 9900, 1000 + 28800]
    # 3 silent frames after 10 played frames: the second piece (frame 10) and the third move by 3 frames
    assert locate_joins(1000, starts, [Underrun(10, 3, 0)]) == [1000 + 9900 + 2880, 1000 + 28800 + 2880]
    assert locate_joins(1000, starts, [Underrun(25, 2, 500)]) == [1000 + 9900, 1000 + 28800 + 1920]


def test_summary_reports_the_worst_join() -> None:
    x, at = clean_join(gap_ms=140)
    y, at2 = clean_join()
    seams = check_joins(x, RATE, [at], [0.0]) + check_joins(y, RATE, [at2], [0.0])
    s = summary(seams)
    assert s["joins"] == 2 and s["join_gap_ms"] == pytest.approx(140, abs=3) and not s["seams_ok"]


# ---------------------------------------------------------------- the playout's figures, end to end


def chunks(turn: int, pieces: list[tuple[str, np.ndarray]], rate: int) -> list[AudioOut]:
    out, seq = [], 0
    for text, pcm in pieces:
        for i in range(0, len(pcm), rate // 5):
            out.append(AudioOut(session="s", turn=turn, seq=seq, rate=rate, pcm=pcm[i: i + rate // 5].tobytes(),
                                text=text if i == 0 else ""))
            seq += 1
    return out


@pytest.mark.parametrize("rate", [22_050, 24_000])
def test_underruns_are_counted_and_the_joins_found_in_the_recording(rate: int) -> None:
    first = np.concatenate([quiet(10, rate), speech(1210, 5, rate), quiet(10, rate)])
    second = np.concatenate([quiet(10, rate), speech(800, 6, rate), quiet(10, rate)])
    playout = Playout()
    recording: list[bytes] = [bytes(1920)] * 7  # the caller heard silence before the reply
    for c in chunks(1, [("Paris is the capital", first)], rate):
        playout.add(c)

    def tick(n: int) -> None:
        for _ in range(n):
            frame = playout.next_frame()
            recording.append(frame.pcm if frame is not None and frame.pcm else bytes(1920))

    tick(70)  # the first piece plays out, then 6 ticks with nothing queued
    assert playout.queued == 0
    late = chunks(1, [("of France.", second)], rate)
    for c in late:
        c.seq += len(chunks(1, [("x", first)], rate))
        playout.add(c)
    playout.add(AudioOut(session="s", turn=1, seq=late[-1].seq + 1, rate=rate, pcm=b"", final=True))
    tick(60)
    stats = playout.turn_stats(1)
    assert stats is not None
    assert stats.gaps == 1 and stats.gap_ms == stats.gap_total_ms
    # 1230 ms of audio = 61.5 frames: 61 whole ones, then the framer's rest went out padded, then the gap
    (underrun,) = stats.underruns
    assert underrun.played == 62 and underrun.frames == 70 - 62 and 0 < underrun.padded < 960
    assert stats.gap_ms == pytest.approx((70 - 62) * 20 + underrun.padded / 48, abs=0.1)
    assert stats.clause_starts == [0, 62 * 960]
    assert len(stats.clause_frames) == 2 and stats.clause_frames[0] == 62

    x = np.frombuffer(b"".join(recording), np.int16)
    seams = check_turn(x, RATE, 0, stats.onset, stats.clause_starts, stats.underruns, [250.0])
    assert len(seams) == 1
    seam = seams[0]
    assert seam.underrun_ms == stats.gap_ms
    # what the caller heard at the join: the gap the playout sent, and the 20 ms of edges around it
    assert seam.silence_ms == pytest.approx(stats.gap_ms + 20, abs=5)
    assert seam.seam_gap_ms <= MAX_GAP_MS and seam.click < MAX_CLICK


def test_no_underrun_is_counted_before_the_first_frame_after_the_last_or_while_paused() -> None:
    playout = Playout()
    assert playout.next_frame() is None
    for c in chunks(2, [("Hello there.", speech(200, 7, 24_000))], 24_000):
        playout.add(c)
    playout.pause()
    for _ in range(5):
        assert playout.next_frame() is None
    playout.resume()
    for _ in range(30):
        playout.next_frame()
    stats = playout.turn_stats(2)
    assert stats is not None and stats.gaps == 0
    assert playout.next_frame() is None
    playout.add(AudioOut(session="s", turn=2, seq=99, rate=24_000, pcm=b"", final=True))
    for _ in range(5):
        playout.next_frame()
    stats = playout.turn_stats(2)
    assert stats is not None
    assert stats.gaps == 0  # silence before an empty end marker is not a gap
