"""Piper TTS engine (piper-tts 1.8, ONNX on CPU or CUDA): one int16 chunk per sentence.

Piper phonemizes the text with its bundled espeak-ng, splits it into
sentences and runs the VITS model once per sentence; `synthesize` yields each
sentence's audio as soon as it exists, so a caller can play the first
sentence while the next one is computed. Methods block: run them in a thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from shared.models import resolve

log = logging.getLogger("voxbus.tts.piper")


class PiperTts:
    def __init__(
        self,
        model: str = "bundled:piper-joe-medium",
        config: str | None = None,
        length_scale: float | None = None,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
        speaker_id: int | None = None,
        use_cuda: bool = False,
        threads: int = 0,
        spin: bool = True,
        warmup: bool = True,
    ) -> None:
        """`threads`: onnxruntime intra-op threads (0: one per core); `spin`: False stops idle
        onnxruntime threads from busy-waiting, which on a small CPU shared with an LLM
        decode thread costs more than it saves; `warmup`: one short synthesis at load (the
        first one also sets up the model's buffers and the phonemizer: ~100 ms for a short
        piece against ~55 ms for the next ones on 2 cores), not in the first caller's reply."""
        self.model = model
        self.config = config
        self.length_scale = length_scale
        self.noise_scale = noise_scale
        self.noise_w_scale = noise_w_scale  # with noise_scale 0.0 too: the same text always gives the same audio
        self.speaker_id = speaker_id
        self.use_cuda = use_cuda
        self.threads = threads
        self.spin = spin
        self.warmup = warmup
        self._voice: Any = None
        self._sample_rate: int | None = None

    def _paths(self) -> tuple[str, str]:
        model_path = resolve(self.model)
        return model_path, resolve(self.config) if self.config else f"{model_path}.json"

    @property
    def sample_rate(self) -> int:
        if self._sample_rate is None:  # readable before load(): the voice config is small
            with open(self._paths()[1], encoding="utf-8") as f:
                self._sample_rate = int(json.load(f)["audio"]["sample_rate"])
        return self._sample_rate

    def load(self) -> None:
        if self._voice is not None:
            return
        import onnxruntime as ort
        from piper import PiperVoice
        from piper.config import PiperConfig

        model_path, config_path = self._paths()
        t0 = time.perf_counter()
        # PiperVoice.load() takes no session options: build the same voice with ours.
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(self.threads))
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = (
            [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})] if self.use_cuda else ["CPUExecutionProvider"]
        )
        with open(config_path, encoding="utf-8") as f:
            config = PiperConfig.from_dict(json.load(f))
        self._voice = PiperVoice(config=config, session=ort.InferenceSession(model_path, sess_options=options, providers=providers))
        self._sample_rate = int(self._voice.config.sample_rate)
        if self.warmup:
            for _ in self.synthesize("Hello."):
                pass
        log.info("Piper voice %s loaded in %.2f s (%d Hz)", model_path, time.perf_counter() - t0, self._sample_rate)

    def _speaker(self, voice: str | None) -> int | None:
        if voice is None:
            return self.speaker_id
        speakers: dict[str, int] = self._voice.config.speaker_id_map or {}
        if voice in speakers:
            return speakers[voice]
        if voice.isdigit() and int(voice) < max(self._voice.config.num_speakers, 1):
            return int(voice)
        if self._voice.config.num_speakers <= 1:
            return self.speaker_id  # single-speaker voice: a job's voice name cannot change it
        raise ValueError(f"unknown Piper speaker {voice!r}; known: {', '.join(sorted(speakers)) or 'none'}")

    def synthesize(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        if self._voice is None:
            raise RuntimeError("PiperTts.load() was not called")
        from piper import SynthesisConfig

        syn = SynthesisConfig(
            speaker_id=self._speaker(voice),
            length_scale=self.length_scale,
            noise_scale=self.noise_scale,
            noise_w_scale=self.noise_w_scale,
        )
        for chunk in self._voice.synthesize(text, syn_config=syn):
            yield chunk.audio_int16_array
