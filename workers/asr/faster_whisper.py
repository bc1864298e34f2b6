"""faster-whisper (CTranslate2 Whisper) as an AsrEngine.

Decoding is deterministic (temperature 0 only, no conditioning on earlier text),
so replaying a session gives the same transcripts. On CUDA, several utterances
are transcribed as one batch through BatchedInferencePipeline.

`encoder_context_s` shortens Whisper's fixed 30 s encoder window for short
utterances (as whisper.cpp's audio_ctx does): the encoder is most of the cost
on a CPU (tiny.en: ~245 ms for 30 s of context, ~20 ms for 10 s on 2 cores),
and a voice turn is rarely longer than a few seconds. The window is never
shorter than the utterance plus `_CONTEXT_MARGIN_S`; below ~10 s Whisper starts
to loop, so that is the floor we recommend. Batched calls honour it too, with
the window of the batch's longest utterance.

A batch mixes sessions, so it never shares one language: utterances are
grouped by their own language (the job's, else the pool's `language`), and
those with none are detected one by one from the batch's encoder output
(the pipeline's `multilingual`). Hub models are looked up in the local cache
first, so a replica with baked-in models never calls the hub (HF_HUB_OFFLINE=1
makes that a rule). On CUDA, `device = "cuda:N"` or `device_index` picks the GPU,
and a warm-up transcription at load proves CTranslate2 has kernels for it
(`workers.asr.ct2_cuda`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.models import ModelMissing, resolve
from workers.asr import AsrResult
from workers.asr.ct2_cuda import check_visible, parse_device, unsupported

log = logging.getLogger("voxbus.asr")

SAMPLE_RATE = 16_000
_MAX_BATCH_CLIP_S = 30.0  # Whisper's window: longer utterances are transcribed alone
_FRAMES_PER_S = 100  # mel frames
_FULL_CONTEXT = 3000
_CONTEXT_MARGIN_S = 2.0
_context = threading.local()  # encoder frames for the transcription running on this thread
_WARMUP_S = 2.0


def _warm_up_audio() -> np.ndarray:
    """A 200 Hz tone pulsing 3 times a second: Whisper decodes tokens from it (dots), unlike from
    silence. The first real transcription after a silent warm-up took 163 ms against 97 ms for the
    next ones (tiny.en, int8, 2 cores); after this one the first takes 99 ms."""
    t = np.arange(int(_WARMUP_S * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 200 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


def _short_context_class(base: type) -> type:
    class ShortContextWhisper(base):  # type: ignore[misc]
        """WhisperModel whose encoder sees only the first `_context.frames` mel frames."""

        def encode(self, features: Any) -> Any:
            frames = getattr(_context, "frames", None)
            if frames and features.shape[-1] > frames:
                features = features[..., :frames]
            return super().encode(features)

    return ShortContextWhisper


class FasterWhisperAsr:
    def __init__(
        self,
        model: str = "bundled:whisper-tiny.en",
        device: str = "cpu",
        compute_type: str = "int8",
        beam_size: int = 1,
        language: str | None = None,
        cpu_threads: int = 0,
        batch_size: int = 8,
        vad_filter: bool = False,
        initial_prompt: str | None = None,
        encoder_context_s: float | None = None,
        device_index: int | list[int] | None = None,
        batched: bool | None = None,
        warmup: bool = True,
    ) -> None:
        if encoder_context_s is not None and not 1.0 <= encoder_context_s <= 30.0:
            raise ValueError(f"encoder_context_s must be within 1..30 s (or None), got {encoder_context_s}")
        self.encoder_context_s = encoder_context_s
        self.model_ref = model
        self.device, self.device_index = parse_device(device, device_index)
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.language = language
        self.cpu_threads = cpu_threads
        self.batch_size = batch_size
        self.vad_filter = vad_filter
        self.initial_prompt = initial_prompt
        self.batched = batched  # None: batch through BatchedInferencePipeline on CUDA only
        self.warmup = warmup  # one transcription at load (see _warm_up)
        self._model: Any = None
        self._pipeline: Any = None
        self._on_cuda = False
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            try:
                from faster_whisper import WhisperModel
            except ImportError as exc:
                raise ModelMissing(
                    f"the faster-whisper ASR engine needs the package {exc.name!r}: pip install 'voxbus[cpu]'"
                ) from exc
            indices = self.device_index if isinstance(self.device_index, list) else [self.device_index]
            if self.device == "cuda":
                check_visible(indices)
            path = self._local_path(resolve(self.model_ref))
            print(f"loading ASR model {self.model_ref} ({path}) on {self.device}:{self.device_index}/{self.compute_type} ...",
                  file=sys.stderr)
            started = time.perf_counter()
            try:
                cls = _short_context_class(WhisperModel) if self.encoder_context_s else WhisperModel
                model = cls(path, device=self.device, device_index=self.device_index,
                            compute_type=self.compute_type, cpu_threads=self.cpu_threads)
            except Exception as exc:  # ctranslate2 / huggingface_hub raise many types for a bad model
                where = f"directory {path}" if Path(path).exists() else f"hub model {path!r} (needs internet on first use)"
                raise ModelMissing(
                    f"cannot load faster-whisper model from {where}: {type(exc).__name__}: {exc}. "
                    f"Pass a CTranslate2 Whisper directory, a hub name, or bundled:whisper-tiny.en"
                ) from exc
            self._on_cuda = getattr(model.model, "device", self.device) == "cuda"
            self._model = model
            if self.warmup:
                try:
                    self._warm_up(indices[0])
                except BaseException:
                    self._model = self._pipeline = None
                    raise
            log.info("ASR model %s loaded in %.2f s", self.model_ref, time.perf_counter() - started)

    def _local_path(self, ref: str) -> str:
        """A hub name as a directory of the local cache when it is there (no hub call), else downloaded."""
        if Path(ref).exists():
            return ref
        from faster_whisper import download_model

        try:
            return str(download_model(ref, local_files_only=True))
        except Exception as exc:
            if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
                raise ModelMissing(
                    f"faster-whisper model {ref!r} is not in the local cache (HF_HOME) and HF_HUB_OFFLINE is set: "
                    "bake it into the image or mount it, or pass a directory") from exc
        try:
            return str(download_model(ref))
        except Exception as exc:
            raise ModelMissing(f"cannot download faster-whisper model {ref!r}: {type(exc).__name__}: {exc}") from exc

    def _warm_up(self, index: int) -> None:
        """One short transcription (a batched one too when the engine batches): CUDA kernels missing
        for this GPU fail here, at load, instead of at the first caller's utterance, and the
        decoder's first run is paid here too."""
        audio = _warm_up_audio()
        try:
            with self._encoder_window(_WARMUP_S):
                segments, _ = self._model.transcribe(audio, **self._options(self.language or "en"), max_new_tokens=24)
                list(segments)
            if self._batches(2):
                self._run_pipeline([audio, audio], self.language or "en")
        except Exception as exc:
            if not self._on_cuda:
                raise
            raise unsupported(index, exc) from exc

    def _batches(self, utterances: int) -> bool:
        if utterances < 2:
            return False
        return self.batched if self.batched is not None else self._on_cuda

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> AsrResult:
        samples = _as_float32(audio)
        duration = len(samples) / SAMPLE_RATE
        if len(samples) == 0:
            return AsrResult("", language or self.language, 0.0)
        self._ensure_loaded()
        with self._encoder_window(duration):
            segments, info = self._model.transcribe(samples, **self._options(language))
            text = "".join(segment.text for segment in segments).strip()
        return AsrResult(text, info.language, duration)

    def transcribe_batch(
        self, audios: list[np.ndarray], language: str | None = None, *, languages: Sequence[str | None] | None = None
    ) -> list[AsrResult]:
        """`languages`: one per utterance (a batch mixes sessions); else `language` for all of them."""
        if languages is not None and len(languages) != len(audios):
            raise ValueError(f"{len(languages)} languages for {len(audios)} utterances")
        langs = list(languages) if languages is not None else [language] * len(audios)
        self._ensure_loaded()
        if self._batches(len(audios)):
            return self._transcribe_batched(audios, langs)
        return [self.transcribe(audio, lang) for audio, lang in zip(audios, langs)]

    def _transcribe_batched(self, audios: list[np.ndarray], languages: Sequence[str | None] | str | None) -> list[AsrResult]:
        """Utterances grouped by language; each group is one pipeline call over its concatenated clips."""
        self._ensure_loaded()
        samples = [_as_float32(a) for a in audios]
        langs = list(languages) if isinstance(languages, Sequence) and not isinstance(languages, str) \
            else [languages] * len(samples)
        results: list[AsrResult | None] = [None] * len(samples)
        groups: dict[str | None, list[int]] = {}
        for i, clip in enumerate(samples):
            seconds = len(clip) / SAMPLE_RATE
            if seconds == 0 or seconds > _MAX_BATCH_CLIP_S:
                results[i] = self.transcribe(clip, langs[i])
            else:
                groups.setdefault(langs[i] or self.language, []).append(i)
        for lang, members in groups.items():
            if len(members) == 1:  # alone, the language (if any) is detected for this utterance
                results[members[0]] = self.transcribe(samples[members[0]], lang)
                continue
            texts = self._run_pipeline([samples[i] for i in members], lang)
            for i, text in zip(members, texts):
                # Without a language each utterance's own was detected, inside the pipeline, unreported.
                results[i] = AsrResult(text, lang or self._only_language(), len(samples[i]) / SAMPLE_RATE)
        return [r if r is not None else AsrResult("", langs[i]) for i, r in enumerate(results)]

    def _run_pipeline(self, clips: list[np.ndarray], language: str | None) -> list[str]:
        """One BatchedInferencePipeline call; `language` None detects each clip's language on its own."""
        if self._pipeline is None:
            from faster_whisper import BatchedInferencePipeline

            self._pipeline = BatchedInferencePipeline(self._model)
        offsets: list[float] = []
        stamps: list[dict[str, float]] = []
        position = 0.0
        for clip in clips:
            seconds = len(clip) / SAMPLE_RATE
            offsets.append(position)
            stamps.append({"start": position, "end": position + seconds})
            position += seconds
        multilingual = language is None and self._only_language() is None
        texts: list[list[str]] = [[] for _ in clips]
        with self._encoder_window(max(len(c) for c in clips) / SAMPLE_RATE):
            segments, _ = self._pipeline.transcribe(
                np.concatenate(clips), clip_timestamps=stamps, batch_size=self.batch_size,
                multilingual=multilingual, **self._options(language))
            for segment in segments:
                # A clip's segments start at or after its offset (timestamps rounded to 1 ms).
                owner = max((k for k, o in enumerate(offsets) if o <= segment.start + 0.0006), default=0)
                texts[owner].append(segment.text)
        return ["".join(t).strip() for t in texts]

    def _only_language(self) -> str | None:
        """"en" for English-only models (tiny.en, distil-large-v3), None for multilingual ones."""
        model = getattr(self._model, "model", None)
        return None if getattr(model, "is_multilingual", True) else "en"

    @contextlib.contextmanager
    def _encoder_window(self, longest_s: float) -> Iterator[None]:
        """Shorten the encoder's window for the transcription run inside (segments are decoded lazily)."""
        if self.encoder_context_s:
            seconds = max(self.encoder_context_s, longest_s + _CONTEXT_MARGIN_S)
            _context.frames = min(_FULL_CONTEXT, int(seconds * _FRAMES_PER_S))
        try:
            yield
        finally:
            _context.frames = None

    def _options(self, language: str | None) -> dict[str, Any]:
        return {
            "language": language or self.language,
            "beam_size": self.beam_size,
            "temperature": 0.0,
            "condition_on_previous_text": False,
            "vad_filter": self.vad_filter,
            "initial_prompt": self.initial_prompt,
            "without_timestamps": True,
        }

    def _ensure_loaded(self) -> None:
        if self._model is None:
            self.load()


def _as_float32(audio: np.ndarray) -> np.ndarray:
    """Mono float32 in [-1, 1]; int16 PCM is scaled."""
    array = np.asarray(audio)
    if array.ndim != 1:
        raise ValueError(f"ASR audio must be mono 1-D samples, got shape {array.shape}")
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"ASR audio must be float32 in [-1, 1] (or int16), got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)
