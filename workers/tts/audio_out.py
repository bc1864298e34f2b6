"""The agent's speech of one TTS job as audio.out messages: Opus packets of one stream per turn
(`OpusOut`, what the recording keeps since it was made compact) or PCM (`AudioOut`, the pool's
`audio_codec = "pcm"`). The TTS stage hands it the shaped audio as it comes."""

from __future__ import annotations

import numpy as np

from shared.opus import OpusStreamEncoder
from shared.protocol import AudioOut, OpusOut, TtsJob


class AgentAudioWriter:
    def __init__(self, job: TtsJob, rate: int, *, opus: bool = True) -> None:
        self.job = job
        self.rate = rate
        self._encoder = OpusStreamEncoder(rate) if opus else None

    def chunk(self, seq: int, pcm: np.ndarray, text: str = "") -> AudioOut | OpusOut | None:
        """The message for `pcm` as chunk `seq`; None while it makes no whole Opus packet yet."""
        if self._encoder is None:
            return AudioOut(session=self.job.session, turn=self.job.turn, seq=seq, rate=self.rate,
                            pcm=pcm.astype(np.int16, copy=False).tobytes(), text=text)
        packets = self._encoder.encode(pcm)
        if not packets:
            return None
        return OpusOut(session=self.job.session, turn=self.job.turn, seq=seq, packets=packets, text=text)

    def final(self, seq: int, text: str = "") -> AudioOut | OpusOut:
        """The turn's last chunk: what the encoder still holds, marked final."""
        if self._encoder is None:
            return AudioOut(session=self.job.session, turn=self.job.turn, seq=seq, rate=self.rate, pcm=b"", final=True)
        return OpusOut(session=self.job.session, turn=self.job.turn, seq=seq, packets=self._encoder.flush(),
                       text=text, final=True)
