"""Tests of the model engines (VAD, ASR, LLM, TTS) with the real bundled models."""
