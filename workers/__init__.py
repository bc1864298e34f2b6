"""voxbus workers: stateless pool workers running ASR, LLM and TTS engines."""
