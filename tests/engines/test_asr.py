"""faster-whisper ASR engine with the bundled whisper tiny.en, on real Piper speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import workers.asr
from shared.models import ModelMissing
from workers.asr.faster_whisper import FasterWhisperAsr

from .speech import corpus_wer, pad_silence, synthesize_16k, to_float32, wer

SENTENCES = [
    "Please call Stella and ask her to bring these things with her from the store.",
    "I would like to book a table for two people tomorrow evening.",
    "What time does the next train to Boston leave?",
    "Can you turn off the lights in the kitchen?",
    "Thank you very much for your help.",
]
MAX_WER = 0.10


@pytest.fixture(scope="module")
def asr() -> FasterWhisperAsr:
    engine = FasterWhisperAsr()
    engine.load()
    return engine


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return [to_float32(pad_silence(synthesize_16k(text), 0.2, 0.2)) for text in SENTENCES]


@pytest.fixture(scope="module")
def transcripts(asr: FasterWhisperAsr, audios: list[np.ndarray]) -> list[str]:
    return [asr.transcribe(audio).text for audio in audios]


def test_transcribes_piper_speech(transcripts: list[str]) -> None:
    assert corpus_wer(list(zip(SENTENCES, transcripts))) <= MAX_WER, transcripts
    assert all(text == text.strip() and text for text in transcripts)


def test_result_fields_and_determinism(asr: FasterWhisperAsr, audios: list[np.ndarray], transcripts: list[str]) -> None:
    result = asr.transcribe(audios[0])
    assert result.text == transcripts[0]  # temperature 0, no conditioning: replay gives the same text
    assert result.language == "en"
    assert result.duration_s == pytest.approx(len(audios[0]) / 16_000)


def test_int16_input_and_empty_audio(asr: FasterWhisperAsr, audios: list[np.ndarray], transcripts: list[str]) -> None:
    pcm = np.round(audios[1] * 32768).clip(-32768, 32767).astype(np.int16)
    assert wer(transcripts[1], asr.transcribe(pcm).text) <= MAX_WER
    assert asr.transcribe(np.zeros(0, dtype=np.float32)).text == ""
    with pytest.raises(ValueError, match="mono"):
        asr.transcribe(np.zeros((2, 16_000), dtype=np.float32))


def test_transcribe_batch_on_cpu_matches_single(asr: FasterWhisperAsr, audios: list[np.ndarray], transcripts: list[str]) -> None:
    results = asr.transcribe_batch(audios[:2])
    assert [r.text for r in results] == transcripts[:2]


def test_batched_pipeline_maps_texts_to_their_utterances(
    asr: FasterWhisperAsr, audios: list[np.ndarray], transcripts: list[str]
) -> None:
    """The CUDA path (BatchedInferencePipeline over concatenated clips), run on CPU."""
    batch = [audios[2], np.zeros(0, dtype=np.float32), audios[3], audios[4]]
    results = asr._transcribe_batched(batch, None)
    assert [r.text for r in results][1] == ""
    expected = [transcripts[2], transcripts[3], transcripts[4]]
    got = [results[0].text, results[2].text, results[3].text]
    assert corpus_wer(list(zip(expected, got))) <= MAX_WER, got
    assert results[2].duration_s == pytest.approx(len(audios[3]) / 16_000)


def test_registry_creates_engine() -> None:
    engine = workers.asr.create("faster-whisper", {"beam_size": 2, "language": "en"})
    assert isinstance(engine, FasterWhisperAsr) and engine.beam_size == 2


def test_missing_model_path_is_a_clear_error() -> None:
    with pytest.raises(ModelMissing, match="/nonexistent/whisper-model"):
        FasterWhisperAsr(model="/nonexistent/whisper-model").load()


def test_directory_without_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing, match="cannot load faster-whisper model from directory"):
        FasterWhisperAsr(model=str(tmp_path)).load()


def test_unknown_bundled_model_is_a_clear_error() -> None:
    with pytest.raises(ModelMissing, match="unknown bundled model"):
        FasterWhisperAsr(model="bundled:whisper-huge").load()


def test_short_encoder_context_keeps_accuracy(audios: list[np.ndarray], transcripts: list[str]) -> None:
    """The CPU pool's 10 s encoder window gives the same words as Whisper's 30 s window."""
    short = FasterWhisperAsr(encoder_context_s=10.0)
    short.load()
    texts = [short.transcribe(a).text for a in audios]
    assert corpus_wer(list(zip(SENTENCES, texts))) <= MAX_WER, texts
    assert [short.transcribe(a).text for a in audios[:2]] == texts[:2]  # deterministic
    long_clip = np.concatenate([audios[0]] * 4)  # ~16 s: the window grows past 10 s to fit it
    assert len(short.transcribe(long_clip).text.split()) >= 3 * len(SENTENCES[0].split())
    with pytest.raises(ValueError, match="encoder_context_s"):
        FasterWhisperAsr(encoder_context_s=0.5)
