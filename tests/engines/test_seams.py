"""PieceShaper: each TTS piece's audio trimmed to `edge_ms` of silence, faded, paused where the text says."""

from __future__ import annotations

import numpy as np
import pytest

from workers.tts.seams import PieceShaper, level

RATE = 22_050
QUIET = int(level(-45.0))
EDGE = 5  # ms, the default


def ns(ms: float) -> int:
    return round(RATE * ms / 1000)


def tone(ms: int, amp: int = 12_000, hz: float = 220.0, phase: float = 0.3) -> np.ndarray:
    t = np.arange(ns(ms)) / RATE
    return (amp * np.sin(2 * np.pi * hz * t + phase)).astype(np.int16)


def hush(ms: int, amp: int = 40) -> np.ndarray:
    """What an engine pads a piece with: silence with a little noise, well under -45 dBFS."""
    return np.random.default_rng(ms).integers(-amp, amp, ns(ms)).astype(np.int16)


def piece(lead_ms: int = 40, trail_ms: int = 200) -> np.ndarray:
    """A piece as an engine returns it: its own silence, a word, a short pause, a word, more silence."""
    return np.concatenate([hush(lead_ms), tone(300), hush(60), tone(250, hz=330), hush(trail_ms)])


def shape(shaper: PieceShaper, chunks: list[np.ndarray], previous: str | None = None) -> list[np.ndarray]:
    """begin + push each chunk + end; the list of what each call returned."""
    out = [shaper.begin(previous)]
    out += [shaper.push(c) for c in chunks]
    out.append(shaper.end())
    return out


def loud_span(x: np.ndarray) -> tuple[int, int]:
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) > QUIET)
    return int(loud[0]), int(loud[-1])


def test_edges_are_cut_to_edge_ms_and_faded_to_zero() -> None:
    x = np.concatenate(shape(PieceShaper(RATE), [piece()]))
    first, last = loud_span(x)
    assert first == pytest.approx(ns(EDGE), abs=2)  # 40 ms of the engine's lead -> 5 ms
    assert len(x) - 1 - last == pytest.approx(ns(EDGE), abs=2)  # 200 ms of its tail -> 5 ms
    assert x[0] == 0 and x[-1] == 0


def test_the_inside_of_a_piece_is_untouched() -> None:
    src = piece()
    x = np.concatenate(shape(PieceShaper(RATE), [src]))
    inner = src[ns(40): ns(40) + ns(610)]  # word, 60 ms pause, word
    assert np.array_equal(x[ns(EDGE): ns(EDGE) + len(inner)], inner)


def test_streamed_chunks_give_the_same_audio_and_the_first_sound_is_not_held() -> None:
    src = piece()
    whole = np.concatenate(shape(PieceShaper(RATE), [src]))
    parts = np.array_split(src, [ns(5), ns(120), ns(400), ns(700)])  # one part all silence, one in the pause
    shaper = PieceShaper(RATE)
    shaper.begin(None)
    assert shaper.push(parts[0]).size == 0  # still the engine's leading silence
    out = shaper.push(parts[1])
    assert out.size and np.abs(out.astype(np.int32)).max() > QUIET  # the first sound goes out at once
    rest = [shaper.push(p) for p in parts[2:]] + [shaper.end()]
    assert np.array_equal(np.concatenate([out, *rest]), whole)
    held = len(src) - sum(len(p) for p in [out, *rest[:-1]]) - ns(40 - EDGE)
    assert held <= ns(200 + 2)  # only the quiet tail (and the fade) waited for the end


def test_two_pieces_join_without_a_step_or_a_gap() -> None:
    shaper = PieceShaper(RATE)
    a = np.concatenate(shape(shaper, [piece()]))
    b = np.concatenate(shape(shaper, [piece(lead_ms=55)], previous="Paris is the capital"))
    joined = np.concatenate([a, b])
    at = len(a)
    diff = np.abs(np.diff(joined.astype(np.int32)))
    assert diff[at - ns(EDGE) + 2: at + ns(EDGE) - 2].max() < QUIET  # silence on both sides of the join, no step
    quiet_run = (len(a) - 1 - loud_span(a)[1]) + loud_span(b)[0]
    assert quiet_run == pytest.approx(ns(2 * EDGE), abs=3)  # 5 ms + 5 ms, not 200 + 55


def test_a_piece_that_starts_or_ends_mid_sound_is_faded() -> None:
    hot = tone(200, amp=20_000, phase=1.2)  # starts and ends far from zero
    x = np.concatenate(shape(PieceShaper(RATE), [hot]))
    assert x[0] == 0 and x[-1] == 0
    assert np.abs(np.diff(x[: ns(3)].astype(np.int32))).max() < 20_000 // 2  # ramps, no full step


@pytest.mark.parametrize(("previous", "pause_ms"), [(None, 0), ("Paris is the capital", 0), ("of France,", 100),
                                                    ("we need:", 100), ("It is lovely.", 250), ("Really?", 250)])
def test_the_pause_goes_before_the_next_piece(previous: str | None, pause_ms: int) -> None:
    shaper = PieceShaper(RATE, clause_pause_ms=100, sentence_pause_ms=250)
    pause = shaper.begin(previous)
    assert len(pause) == ns(pause_ms) and not pause.any()
    assert shaper.pause_ms(previous) == pytest.approx(pause_ms, abs=0.1)


def test_an_all_silent_piece_gives_nothing() -> None:
    assert np.concatenate(shape(PieceShaper(RATE), [hush(300), hush(100)])).size == 0


def test_edge_ms_minus_one_leaves_the_engine_audio_alone() -> None:
    src = piece()
    shaper = PieceShaper(RATE, edge_ms=-1)
    out = shape(shaper, [src], previous="of France,")
    assert out[0].size == 0 and out[-1].size == 0
    assert np.array_equal(np.concatenate(out), src)


def test_other_edges_and_rates() -> None:
    rate = 24_000
    src = np.concatenate([np.zeros(rate // 10, np.int16), (9000 * np.sin(np.arange(rate // 2) / 7)).astype(np.int16),
                          np.zeros(rate // 4, np.int16)])
    x = np.concatenate(shape(PieceShaper(rate, edge_ms=25, fade_ms=5.0), [src]))
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) > QUIET)
    assert loud[0] == pytest.approx(rate * 25 // 1000, abs=2)
    assert len(x) - 1 - loud[-1] == pytest.approx(rate * 25 // 1000, abs=2)
