"""Silero VAD engine and the batched endpointer, on real Piper speech."""

from __future__ import annotations

import numpy as np
import pytest

import bridge.vad
from bridge.vad.segmenter import BatchVad, EndpointConfig, SpeechSegmenter, VadEvent
from bridge.vad.silero import SileroVad
from shared.protocol import FRAME_BYTES, FRAME_MS, SpeechEnd, SpeechStart

from .speech import pad_silence, speech_bounds, synthesize_16k, to_frames

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "What time does the next train to Boston leave?",
    "Thank you very much for your help.",
]
TOLERANCE_MS = 100.0


@pytest.fixture(scope="module")
def engine() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def utterances() -> list[np.ndarray]:
    """Each sentence with 1 s of silence before and after."""
    return [pad_silence(synthesize_16k(text), 1.0, 1.0) for text in SENTENCES]


def run_session(vad: BatchVad, sid: str, audio: np.ndarray, first_seq: int = 0) -> list[VadEvent]:
    events: list[VadEvent] = []
    for i, frame in enumerate(to_frames(audio)):
        vad.push(sid, first_seq + i, frame)
        events.extend(event for owner, event in vad.process() if owner == sid)
    return events


def assert_matches_truth(events: list[VadEvent], audio: np.ndarray, first_seq: int = 0) -> None:
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd], events
    start, end = events
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    first, last = speech_bounds(audio)
    start_ms = (start.frame - first_seq) * FRAME_MS
    end_ms = (end.end_frame - first_seq + 1) * FRAME_MS  # end of the last voiced frame
    assert abs(start_ms - first / 16) <= TOLERANCE_MS, (start_ms, first / 16)
    assert abs(end_ms - (last + 1) / 16) <= TOLERANCE_MS, (end_ms, (last + 1) / 16)
    assert end.start_frame == start.frame
    assert end.silence_ms >= EndpointConfig().min_silence_ms


def test_registry_creates_silero() -> None:
    vad = bridge.vad.create("silero", {"threads": 1})
    assert isinstance(vad, SileroVad) and vad.window_samples == 512


def test_batched_scores_equal_sequential(engine: SileroVad, utterances: list[np.ndarray]) -> None:
    # Rows start at different offsets so each session's state evolves differently.
    signals = [u[offset:].astype(np.float32) / 32768 for u in utterances for offset in (0, 7_000)]
    n_windows = min(len(s) for s in signals) // 512
    sequential = np.zeros((len(signals), n_windows), dtype=np.float32)
    for row, signal in enumerate(signals):
        state = engine.new_state()
        for w in range(n_windows):
            probs, [state] = engine.score(signal[None, w * 512 : (w + 1) * 512], [state])
            sequential[row, w] = probs[0]
    batched = np.zeros_like(sequential)
    states = [engine.new_state() for _ in signals]
    for w in range(n_windows):
        windows = np.stack([s[w * 512 : (w + 1) * 512] for s in signals])
        batched[:, w], states = engine.score(windows, states)
    assert sequential.max() > 0.9 and sequential.min() < 0.1  # real speech and real silence were scored
    np.testing.assert_allclose(batched, sequential, atol=1e-5)


def test_score_rejects_bad_shapes(engine: SileroVad) -> None:
    with pytest.raises(ValueError, match="shape"):
        engine.score(np.zeros((2, 320), dtype=np.float32), [engine.new_state()] * 2)
    with pytest.raises(ValueError, match="states"):
        engine.score(np.zeros((2, 512), dtype=np.float32), [engine.new_state()])
    probs, states = engine.score(np.zeros((0, 512), dtype=np.float32), [])
    assert probs.shape == (0,) and states == []


def test_finds_start_and_end_of_an_utterance(engine: SileroVad, utterances: list[np.ndarray]) -> None:
    for audio in utterances:
        vad = BatchVad(engine)
        vad.add("caller")
        assert_matches_truth(run_session(vad, "caller", audio), audio)
        assert not vad.in_speech("caller")


def test_interleaved_sessions_get_their_own_events(engine: SileroVad, utterances: list[np.ndarray]) -> None:
    silence = np.zeros(3 * 16_000, dtype=np.int16)
    sessions = {  # sid -> (audio, first seq, tick it joins)
        "s0": (utterances[0], 0, 0),
        "s1": (pad_silence(utterances[1], 0.5, 0.0), 5_000, 7),
        "s2": (utterances[2], 123, 31),
        "quiet": (silence, 40, 3),
    }
    vad = BatchVad(engine)
    frames = {sid: to_frames(audio) for sid, (audio, _, _) in sessions.items()}
    events: dict[str, list[VadEvent]] = {sid: [] for sid in sessions}
    last_tick = max(join + len(frames[sid]) for sid, (_, _, join) in sessions.items())
    for tick in range(last_tick):
        for sid, (_, first_seq, join) in sessions.items():
            i = tick - join
            if i == 0:
                vad.add(sid)
            if 0 <= i < len(frames[sid]):
                vad.push(sid, first_seq + i, frames[sid][i])
        for sid, event in vad.process():
            assert event.session == sid
            events[sid].append(event)
    assert events["quiet"] == []
    for sid in ("s0", "s1", "s2"):
        audio, first_seq, _ = sessions[sid]
        assert_matches_truth(events[sid], audio, first_seq)
        alone = BatchVad(engine)
        alone.add(sid)
        assert _without_ts(events[sid]) == _without_ts(run_session(alone, sid, audio, first_seq))


def _without_ts(events: list[VadEvent]) -> list[tuple[type, dict[str, object]]]:
    return [(type(e), {f: getattr(e, f) for f in e.__struct_fields__ if f != "ts"}) for e in events]


def test_bad_frames_are_rejected_and_other_sessions_continue(engine: SileroVad, utterances: list[np.ndarray]) -> None:
    vad = BatchVad(engine)
    vad.add("good")
    vad.add("bad")
    with pytest.raises(ValueError, match="bytes"):
        vad.push("bad", 0, b"\x00" * (FRAME_BYTES - 2))
    with pytest.raises(ValueError, match="Hz"):
        vad.push("bad", 0, b"\x00" * FRAME_BYTES, rate=48_000)
    with pytest.raises(ValueError, match="bytes"):
        vad.push("bad", 0, "not audio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown"):
        vad.push("nobody", 0, b"\x00" * FRAME_BYTES)
    vad.push("bad", 10, b"\x00" * FRAME_BYTES)
    with pytest.raises(ValueError, match="not after"):
        vad.push("bad", 10, b"\x00" * FRAME_BYTES)
    with pytest.raises(ValueError, match="already"):
        vad.add("good")
    with pytest.raises(ValueError, match="session id"):
        vad.add("bad:{id}")
    assert_matches_truth(run_session(vad, "good", utterances[0]), utterances[0])


class _FailingFor:
    """Wraps the real engine; raises whenever a window of all-`marker` samples is scored."""

    def __init__(self, engine: SileroVad, marker: float) -> None:
        self.engine, self.marker = engine, marker
        self.window_samples = engine.window_samples
        self.new_state = engine.new_state

    def score(self, windows: np.ndarray, states: list[object]) -> tuple[np.ndarray, list[object]]:
        if np.any(np.all(windows == self.marker, axis=1)):
            raise RuntimeError("inference failed")
        return self.engine.score(windows, states)  # type: ignore[arg-type]


def test_one_failing_session_is_dropped_not_the_batch(engine: SileroVad, utterances: list[np.ndarray]) -> None:
    marker = 1000 / 32768
    vad = BatchVad(_FailingFor(engine, marker))  # type: ignore[arg-type]
    vad.add("good")
    vad.add("poison")
    poison = np.full(320, 1000, dtype=np.int16).tobytes()
    events: list[VadEvent] = []
    for i, frame in enumerate(to_frames(utterances[1])):
        vad.push("good", i, frame)
        if i < 2:  # lands in the same batch as "good" at tick 1
            vad.push("poison", i, poison)
        events.extend(e for _, e in vad.process())
    assert_matches_truth(events, utterances[1])
    assert "poison" not in vad and "good" in vad
    with pytest.raises(ValueError, match="unknown"):
        vad.push("poison", 5, poison)


def test_frame_gaps_are_filled_and_seqs_mapped(engine: SileroVad, utterances: list[np.ndarray]) -> None:
    """Lost frames count as silence: event seqs stay the caller's frame seqs."""
    audio = utterances[0]
    frames = to_frames(audio)
    lost = set(range(10, 20))  # 200 ms lost in the leading silence
    vad = BatchVad(engine)
    vad.add("lossy")
    events: list[VadEvent] = []
    for i, frame in enumerate(frames):
        if i not in lost:
            vad.push("lossy", 1_000 + i, frame)
            events.extend(e for _, e in vad.process())
    assert_matches_truth(events, audio, first_seq=1_000)


class _Scripted:
    """Engine stub replaying fixed probabilities, to pin the state machine's rules."""

    window_samples = 512

    def __init__(self, probs: list[float]) -> None:
        self.probs = iter(probs)

    def new_state(self) -> None:
        return None

    def score(self, windows: np.ndarray, states: list[None]) -> tuple[np.ndarray, list[None]]:
        return np.array([next(self.probs) for _ in windows], dtype=np.float32), states


def _scripted_events(probs: list[float], **config: object) -> list[VadEvent]:
    vad = BatchVad(_Scripted(probs), **config)  # type: ignore[arg-type]
    vad.add("x")
    events: list[VadEvent] = []
    tone = (np.sin(np.arange(320) * 0.3) * 8000).astype(np.int16).tobytes()
    for seq in range(len(probs) * 512 // 320):
        vad.push("x", seq, tone)
        events.extend(e for _, e in vad.process())
    return events


def test_hysteresis_and_min_speech() -> None:
    # 0.4 sits between neg_threshold (0.35) and threshold: it neither starts nor ends speech.
    events = _scripted_events(
        [0.1, 0.9, 0.1, 0.1, 0.4, 0.9, 0.9, 0.9, 0.4, 0.4, 0.4, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1],
        min_speech_ms=64, min_silence_ms=96, speech_pad_ms=0, end_trim_db=None,
    )
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    start, end = events
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    # the lone 0.9 at window 1 is a blip (< 64 ms); speech starts at window 5 = sample 2560 = frame 8
    assert start.frame == 2560 // 320
    # silence starts at window 12 (sample 6144): the last voiced sample 6143 is in frame 19
    assert end.end_frame == 6143 // 320
    assert end.silence_ms == pytest.approx(96.0)


def test_max_speech_forces_an_end() -> None:
    events = _scripted_events([0.9] * 40, min_speech_ms=0, max_speech_ms=320, speech_pad_ms=0)
    kinds = [type(e) for e in events]
    assert kinds[:4] == [SpeechStart, SpeechEnd, SpeechStart, SpeechEnd]
    assert events[1].end_frame == 10 * 512 // 320 - 1  # type: ignore[union-attr]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        EndpointConfig(threshold=1.5)
    with pytest.raises(ValueError):
        EndpointConfig(threshold=0.5, neg_threshold=0.7)
    with pytest.raises(ValueError):
        SpeechSegmenter("bad id", EndpointConfig(), 512)
