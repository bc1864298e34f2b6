"""faster-whisper's GPU paths without a GPU: device strings, per-utterance languages in a batch,
the encoder window on batched calls, the load-time CUDA check and hub look-ups.

A double replaces faster-whisper's WhisperModel / BatchedInferencePipeline /
download_model where CUDA would be needed; it is as strict as CTranslate2 on
what it is given (a device of "cpu", "cuda" or "auto" only). The encoder-window
test also runs the real batched pipeline with the bundled tiny.en on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faster_whisper
import numpy as np
import pytest

from shared.models import ModelMissing
from shared.wer import corpus_wer
from workers.asr import ct2_cuda
from workers.asr.faster_whisper import FasterWhisperAsr

from .speech import pad_silence, synthesize_16k, to_float32

SR = 16_000


@dataclass
class Segment:
    text: str
    start: float = 0.0


@dataclass
class Info:
    language: str | None


@dataclass
class Ct2Whisper:
    device: str
    device_index: list[int]
    is_multilingual: bool = True


@dataclass
class Recorder:
    models: list[dict[str, Any]] = field(default_factory=list)
    single: list[dict[str, Any]] = field(default_factory=list)  # WhisperModel.transcribe options
    batched: list[dict[str, Any]] = field(default_factory=list)  # pipeline calls: options + clip count
    encoded: list[tuple[int, ...]] = field(default_factory=list)  # feature shapes given to the encoder
    downloads: list[tuple[str, bool]] = field(default_factory=list)
    fail_transcribe: str | None = None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()

    class FakeWhisperModel:
        def __init__(self, path: str, *, device: str, device_index: int | list[int], compute_type: str,
                     cpu_threads: int) -> None:
            if device not in ("cpu", "cuda", "auto"):  # ctranslate2: "unsupported device cuda:1"
                raise ValueError(f"unsupported device {device}")
            rec.models.append({"path": path, "device": device, "device_index": device_index})
            index = device_index if isinstance(device_index, list) else [device_index]
            self.model = Ct2Whisper("cuda" if device != "cpu" else "cpu", index)

        def encode(self, features: Any) -> Any:
            rec.encoded.append(tuple(features.shape))
            return features

        def transcribe(self, audio: np.ndarray, **options: Any) -> tuple[list[Segment], Info]:
            if rec.fail_transcribe:
                raise RuntimeError(rec.fail_transcribe)
            rec.single.append(options)
            self.encode(np.zeros((1, 80, 3000), dtype=np.float32))
            return [Segment(f"one:{len(audio)}")], Info(options["language"] or "detected")

    class FakePipeline:
        def __init__(self, model: FakeWhisperModel) -> None:
            self.model = model

        def transcribe(self, audio: np.ndarray, *, clip_timestamps: list[dict[str, float]], batch_size: int,
                       multilingual: bool = False, **options: Any) -> tuple[Any, Info]:
            rec.batched.append(dict(options, multilingual=multilingual, clips=len(clip_timestamps)))

            def segments() -> Any:  # lazy, as the real pipeline: the encoder runs while iterating
                self.model.encode(np.zeros((len(clip_timestamps), 80, 3000), dtype=np.float32))
                for k, clip in enumerate(clip_timestamps):
                    yield Segment(f"clip{k}:{round((clip['end'] - clip['start']) * SR)}", start=clip["start"])

            return segments(), Info(options["language"] or "batch-language")

    def download_model(ref: str, local_files_only: bool = False) -> str:
        rec.downloads.append((ref, local_files_only))
        if local_files_only and ref == "cached-model":
            return f"/hf/{ref}"
        if local_files_only:
            raise FileNotFoundError(f"{ref} is not in the cache")
        return f"/downloaded/{ref}"

    monkeypatch.setattr(faster_whisper, "WhisperModel", FakeWhisperModel)
    monkeypatch.setattr(faster_whisper, "BatchedInferencePipeline", FakePipeline)
    monkeypatch.setattr(faster_whisper, "download_model", download_model)
    monkeypatch.setattr("ctranslate2.get_cuda_device_count", lambda: 2)
    return rec


def clip(seconds: float) -> np.ndarray:
    return np.full(int(seconds * SR), 0.01, dtype=np.float32)


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize(("device", "index", "expected"), [
    ("cuda:1", None, ("cuda", 1)), ("cuda", 1, ("cuda", 1)), ("cuda", [0, 1], ("cuda", [0, 1])),
    ("cpu", None, ("cpu", 0)), ("auto", None, ("auto", 0)), ("CUDA:0", 0, ("cuda", 0)),
])
def test_device_strings(device: str, index: int | list[int] | None, expected: tuple[str, Any]) -> None:
    assert ct2_cuda.parse_device(device, index) == expected


@pytest.mark.parametrize(("device", "index"), [("gpu", None), ("cpu:1", None), ("cuda:x", None), ("cuda:1", 0)])
def test_bad_device_strings_are_refused_at_config_time(device: str, index: int | None) -> None:
    with pytest.raises(ValueError, match="device"):
        FasterWhisperAsr(model="cached-model", device=device, device_index=index)


def test_cuda_colon_n_reaches_ctranslate2_as_a_device_index(fake: Recorder) -> None:
    FasterWhisperAsr(model="cached-model", device="cuda:1", compute_type="float16").load()
    assert fake.models[-1]["device"] == "cuda" and fake.models[-1]["device_index"] == 1


def test_no_visible_gpu_is_a_clear_error(fake: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ctranslate2.get_cuda_device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        FasterWhisperAsr(model="cached-model", device="cuda").load()
    with pytest.raises(RuntimeError, match=r"device_index \[3\] does not exist"):
        monkeypatch.setattr("ctranslate2.get_cuda_device_count", lambda: 2)
        FasterWhisperAsr(model="cached-model", device="cuda:3").load()


def test_a_gpu_without_kernels_fails_at_load_with_what_to_do(fake: Recorder) -> None:
    fake.fail_transcribe = "CUDA failed with error no kernel image is available for execution on the device"
    engine = FasterWhisperAsr(model="cached-model", device="cuda", compute_type="float16")
    with pytest.raises(RuntimeError, match=r"cannot run on cuda:0 .*no kernel image.*compute capability 8\.x"):
        engine.load()
    assert engine._model is None  # a later load() tries again instead of using the broken model


def test_the_warm_up_runs_the_batched_path_too(fake: Recorder) -> None:
    FasterWhisperAsr(model="cached-model", device="cuda").load()
    assert len(fake.single) == 1 and len(fake.batched) == 1


# ---------------------------------------------------------------- languages in a batch


def test_a_batch_never_shares_one_language_across_utterances(fake: Recorder) -> None:
    engine = FasterWhisperAsr(model="cached-model", device="cuda", warmup=False)
    audios = [clip(1.0), clip(2.0), clip(3.0), clip(1.5), clip(2.5)]
    results = engine.transcribe_batch(audios, languages=["en", "fr", None, "en", None])
    en = [c for c in fake.batched if c["language"] == "en"]
    detect = [c for c in fake.batched if c["language"] is None]
    assert len(en) == 1 and en[0]["clips"] == 2 and not en[0]["multilingual"]
    assert len(detect) == 1 and detect[0]["clips"] == 2 and detect[0]["multilingual"]  # detected per utterance
    assert [o["language"] for o in fake.single] == ["fr"]  # alone in its language
    assert [r.language for r in results] == ["en", "fr", None, "en", None]
    assert [r.text for r in results] == ["clip0:16000", "one:32000", "clip0:48000", "clip1:24000", "clip1:40000"]


def test_the_pool_language_fills_in_for_utterances_without_one(fake: Recorder) -> None:
    engine = FasterWhisperAsr(model="cached-model", device="cuda", language="de", warmup=False)
    engine.transcribe_batch([clip(1.0), clip(2.0)])
    assert [(c["language"], c["multilingual"], c["clips"]) for c in fake.batched] == [("de", False, 2)]


def test_encoder_window_applies_to_batched_calls(fake: Recorder) -> None:
    engine = FasterWhisperAsr(model="cached-model", device="cuda", encoder_context_s=10.0, warmup=False)
    engine.transcribe_batch([clip(3.0), clip(12.0)], languages=["en", "en"])
    assert fake.encoded[-1] == (2, 80, 1400)  # the longest utterance (12 s) + 2 s margin
    engine.transcribe_batch([clip(2.0), clip(3.0)], languages=["en", "en"])
    assert fake.encoded[-1] == (2, 80, 1000)


def test_encoder_window_on_the_real_batched_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny.en, batched through BatchedInferencePipeline on the CPU with a 10 s encoder window."""
    sentences = ["What time does the next train to Boston leave?", "Can you turn off the lights in the kitchen?",
                 "Thank you very much for your help."]
    audios = [to_float32(pad_silence(synthesize_16k(s), 0.2, 0.2)) for s in sentences]
    shapes: list[tuple[int, ...]] = []
    encode = faster_whisper.WhisperModel.encode

    def spy(self: Any, features: Any) -> Any:  # what reaches CTranslate2, after the window was applied
        shapes.append(tuple(features.shape))
        return encode(self, features)

    monkeypatch.setattr(faster_whisper.WhisperModel, "encode", spy)
    engine = FasterWhisperAsr(encoder_context_s=10.0, batched=True)
    engine.load()
    results = engine.transcribe_batch(audios)
    assert shapes and shapes[-1][0] == 3 and shapes[-1][-1] == 1000, shapes
    assert corpus_wer(list(zip(sentences, [r.text for r in results]))) <= 0.10, [r.text for r in results]
    assert all(r.language == "en" for r in results)


# ---------------------------------------------------------------- the hub


def test_a_cached_hub_model_is_used_without_calling_the_hub(fake: Recorder) -> None:
    FasterWhisperAsr(model="cached-model", device="cpu").load()
    assert fake.downloads == [("cached-model", True)]
    assert fake.models[-1]["path"] == "/hf/cached-model"


def test_hf_hub_offline_refuses_a_model_missing_from_the_cache(fake: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelMissing, match="HF_HUB_OFFLINE"):
        FasterWhisperAsr(model="large-v3-turbo").load()
    assert fake.downloads == [("large-v3-turbo", True)]


def test_a_model_missing_from_the_cache_is_downloaded_once_online(fake: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    FasterWhisperAsr(model="large-v3-turbo").load()
    assert fake.downloads == [("large-v3-turbo", True), ("large-v3-turbo", False)]
    assert fake.models[-1]["path"] == "/downloaded/large-v3-turbo"
