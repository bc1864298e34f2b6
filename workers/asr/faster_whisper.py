"""faster-whisper (CTranslate2 Whisper) as an AsrEngine.

Decoding is deterministic (temperature 0 only, no conditioning on earlier text),
so replaying a session gives the same transcripts. On CUDA, several utterances
are transcribed as one batch through BatchedInferencePipeline.

`encoder_context_s` shortens Whisper's fixed 30 s encoder window for short
utterances (as whisper.cpp's audio_ctx does): the encoder is most of the cost
on a CPU (tiny.en: ~245 ms for 30 s of context, ~20 ms for 10 s on 2 cores),
and a voice turn is rarely longer than a few seconds. The window is never
shorter than the utterance plus `_CONTEXT_MARGIN_S`; below ~10 s Whisper starts
to loop, so that is the floor we recommend.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.models import ModelMissing, resolve
from workers.asr import AsrResult

log = logging.getLogger("voxbus.asr")

SAMPLE_RATE = 16_000
_MAX_BATCH_CLIP_S = 30.0  # Whisper's window: longer utterances are transcribed alone
_FRAMES_PER_S = 100  # mel frames
_FULL_CONTEXT = 3000
_CONTEXT_MARGIN_S = 2.0
_context = threading.local()  # encoder frames for the transcription running on this thread


def _short_context_class(base: type) -> type:
    class ShortContextWhisper(base):  # type: ignore[misc, valid-type]
        """WhisperModel whose encoder sees only the first `_context.frames` mel frames."""

        def encode(self, features):  # noqa: ANN001, ANN201 - faster-whisper's own signature
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
    ) -> None:
        if encoder_context_s is not None and not 1.0 <= encoder_context_s <= 30.0:
            raise ValueError(f"encoder_context_s must be within 1..30 s (or None), got {encoder_context_s}")
        self.encoder_context_s = encoder_context_s
        self.model_ref = model
        self.device = device
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.language = language
        self.cpu_threads = cpu_threads
        self.batch_size = batch_size
        self.vad_filter = vad_filter
        self.initial_prompt = initial_prompt
        self._model: Any = None
        self._pipeline: Any = None
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
            path = resolve(self.model_ref)
            print(f"loading ASR model {self.model_ref} ({path}) on {self.device}/{self.compute_type} ...", file=sys.stderr)
            started = time.perf_counter()
            try:
                cls = _short_context_class(WhisperModel) if self.encoder_context_s else WhisperModel
                self._model = cls(
                    path, device=self.device, compute_type=self.compute_type, cpu_threads=self.cpu_threads
                )
            except Exception as exc:  # ctranslate2 / huggingface_hub raise many types for a bad model
                where = f"directory {path}" if Path(path).exists() else f"hub model {path!r} (needs internet on first use)"
                raise ModelMissing(
                    f"cannot load faster-whisper model from {where}: {type(exc).__name__}: {exc}. "
                    f"Pass a CTranslate2 Whisper directory, a hub name, or bundled:whisper-tiny.en"
                ) from exc
            log.info("ASR model %s loaded in %.2f s", self.model_ref, time.perf_counter() - started)

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> AsrResult:
        samples = _as_float32(audio)
        duration = len(samples) / SAMPLE_RATE
        if len(samples) == 0:
            return AsrResult("", language or self.language, 0.0)
        self._ensure_loaded()
        if self.encoder_context_s:
            seconds = max(self.encoder_context_s, duration + _CONTEXT_MARGIN_S)
            _context.frames = min(_FULL_CONTEXT, int(seconds * _FRAMES_PER_S))
        try:
            segments, info = self._model.transcribe(samples, **self._options(language))
            text = "".join(segment.text for segment in segments).strip()
        finally:
            _context.frames = None
        return AsrResult(text, info.language, duration)

    def transcribe_batch(self, audios: list[np.ndarray], language: str | None = None) -> list[AsrResult]:
        if self.device.startswith("cuda") and len(audios) > 1:
            return self._transcribe_batched(audios, language)
        return [self.transcribe(audio, language) for audio in audios]

    def _transcribe_batched(self, audios: list[np.ndarray], language: str | None) -> list[AsrResult]:
        """Concatenate the utterances and hand each one to the pipeline as its own clip."""
        self._ensure_loaded()
        samples = [_as_float32(a) for a in audios]
        results: list[AsrResult | None] = [None] * len(samples)
        offsets: list[tuple[int, float]] = []  # (utterance index, offset s) of each batched clip
        clips: list[dict[str, float]] = []
        pieces: list[np.ndarray] = []
        position = 0
        for i, clip in enumerate(samples):
            seconds = len(clip) / SAMPLE_RATE
            if seconds == 0 or seconds > _MAX_BATCH_CLIP_S:
                results[i] = self.transcribe(clip, language)
                continue
            start = position / SAMPLE_RATE
            offsets.append((i, start))
            clips.append({"start": start, "end": start + seconds})
            pieces.append(clip)
            position += len(clip)
        if clips:
            if self._pipeline is None:
                from faster_whisper import BatchedInferencePipeline

                self._pipeline = BatchedInferencePipeline(self._model)
            segments, info = self._pipeline.transcribe(
                np.concatenate(pieces), clip_timestamps=clips, batch_size=self.batch_size, **self._options(language)
            )
            texts: dict[int, list[str]] = {i: [] for i, _ in offsets}
            for segment in segments:
                # A clip's segments start at or after its offset (timestamps rounded to 1 ms).
                owner = max((o for o in offsets if o[1] <= segment.start + 0.0006), key=lambda o: o[1], default=offsets[0])
                texts[owner[0]].append(segment.text)
            for i, _ in offsets:
                results[i] = AsrResult("".join(texts[i]).strip(), info.language, len(samples[i]) / SAMPLE_RATE)
        return [r if r is not None else AsrResult("", language) for r in results]

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
