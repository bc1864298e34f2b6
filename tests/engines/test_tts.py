"""Piper (joe voice) and Kokoro-82M TTS engines: their speech is transcribed back with whisper tiny.en."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import workers.tts
from shared.models import resolve
from workers.tts.kokoro import KokoroTts
from workers.tts.piper import PiperTts

from .speech import resample_to_16k, to_float32, wer

SENTENCE = "Please call Stella and ask her to bring these things with her from the store."
THREE_SENTENCES = "The train leaves at noon. It arrives in Boston at five. Bring a warm coat!"
MAX_WER = 0.10


@pytest.fixture(scope="module")
def whisper():  # type: ignore[no-untyped-def]
    from faster_whisper import WhisperModel

    return WhisperModel(resolve("bundled:whisper-tiny.en"), device="cpu", compute_type="int8")


def transcribe(whisper, audio: np.ndarray, rate: int) -> str:  # type: ignore[no-untyped-def]
    segments, _ = whisper.transcribe(to_float32(resample_to_16k(audio, rate)), language="en", beam_size=1)
    return " ".join(s.text for s in segments)


@pytest.fixture(scope="module")
def piper() -> PiperTts:
    engine = PiperTts(noise_scale=0.0, noise_w_scale=0.0)  # no generator noise: the same audio every run
    engine.load()
    return engine


@pytest.fixture(scope="module")
def kokoro() -> Iterator[KokoroTts]:
    engine = KokoroTts(voice="jf_alpha")
    engine.load()
    yield engine


def test_piper_speech_transcribes_back_to_the_text(piper: PiperTts, whisper) -> None:  # type: ignore[no-untyped-def]
    chunks = list(piper.synthesize(SENTENCE))
    assert all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    audio = np.concatenate(chunks)
    assert 2.0 < len(audio) / piper.sample_rate < 8.0
    hyp = transcribe(whisper, audio, piper.sample_rate)
    assert wer(SENTENCE, hyp) <= MAX_WER, hyp


def test_piper_yields_a_chunk_per_sentence(whisper) -> None:  # type: ignore[no-untyped-def]
    engine = PiperTts()  # the default settings, generator noise included
    engine.load()
    chunks = list(engine.synthesize(THREE_SENTENCES))
    assert len(chunks) == 3
    assert all(len(c) > 0.3 * engine.sample_rate for c in chunks)
    first = transcribe(whisper, chunks[0], engine.sample_rate).lower()
    assert "train" in first and "noon" in first and "boston" not in first, first  # the first sentence only


def test_piper_sample_rate_is_known_before_load() -> None:
    assert PiperTts().sample_rate == 22050


def test_piper_single_speaker_voice_ignores_a_job_voice_name(piper: PiperTts) -> None:
    assert len(list(piper.synthesize("Hello there.", voice="someone"))) == 1


def test_piper_thread_options_reach_onnxruntime_and_change_no_sample(piper: PiperTts) -> None:
    lean = PiperTts(noise_scale=0.0, noise_w_scale=0.0, threads=1, spin=False)
    lean.load()
    options = lean._voice.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    same = np.concatenate(list(lean.synthesize(SENTENCE)))
    assert np.array_equal(same, np.concatenate(list(piper.synthesize(SENTENCE))))


def test_piper_length_scale_slows_speech(piper: PiperTts) -> None:
    slow = PiperTts(length_scale=1.6, noise_scale=0.0, noise_w_scale=0.0)
    slow.load()
    normal = np.concatenate(list(piper.synthesize(SENTENCE)))
    slower = np.concatenate(list(slow.synthesize(SENTENCE)))
    assert len(slower) > 1.3 * len(normal)


def test_kokoro_speech_transcribes_back_to_the_text(kokoro: KokoroTts, whisper) -> None:  # type: ignore[no-untyped-def]
    # The shipped voice styles are Japanese: English comes out accented, so the text has
    # enough words (17) that one misheard word stays under MAX_WER.
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
    chunks = list(kokoro.synthesize(text))
    assert len(chunks) == 2
    assert all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    hyp = transcribe(whisper, np.concatenate(chunks), kokoro.sample_rate)
    assert wer(text, hyp) <= MAX_WER, hyp


def test_kokoro_unknown_voice_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="jf_alpha"):
        KokoroTts(voice="af_heart").load()


def test_registry_builds_the_engines() -> None:
    assert isinstance(workers.tts.create("piper", {"length_scale": 1.1}), PiperTts)
    kokoro = workers.tts.create("kokoro", {"voice": "jm_kumo", "speed": 1.2})
    assert isinstance(kokoro, KokoroTts) and kokoro.sample_rate == 24000
