"""voxbus bridge: owns live calls (WebRTC in and out, VAD, turn state, playout)."""
