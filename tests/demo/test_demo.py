"""`voxbus demo` end to end, as a user runs it: real processes, real models, real WebRTC.

Each run starts Redis (embedded when REDIS_URL is unset), the three CPU
workers, the bridge and a simulated aiortc caller, exactly like README's
first command. Figures are checked for sanity, not speed (speed lives in the
closing notes and ops/bench).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engines.speech import wer

ROOT = Path(__file__).resolve().parents[2]
LATENCIES = ("voice_to_voice_ms", "response_ms", "asr_ms", "llm_ttft_ms", "tts_first_audio_ms", "endpoint_ms")


def run_demo(*args: str, env_extra: dict[str, str] | None = None, drop_redis: bool = False,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **(env_extra or {}))
    if drop_redis:
        env.pop("REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "shared.cli", "demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def parse(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_demo_answers_a_spoken_question_on_embedded_redis(tmp_path: Path) -> None:
    result = parse(run_demo("--json", "--out", str(tmp_path), drop_redis=True))
    assert wer("What is the capital of France?", result["user_transcript"]) == 0.0, result
    assert len(result["agent_text"].split()) >= 3, result
    for key in LATENCIES:
        assert result[key] > 0, (key, result)
    assert result["voice_to_voice_ms"] > result["response_ms"] > 0
    assert 0 < result["bus_overhead_ms"] < result["response_ms"]
    assert (tmp_path / "reply.wav").stat().st_size > 48_000  # more than half a second of reply audio
    assert "capital" in (tmp_path / "transcript.txt").read_text().lower()
    assert json.loads((tmp_path / "waterfall.json").read_text())["session_id"] == result["session_id"]


CONVERSATION = ["What is the capital of Germany?", "And how many people live there?",
                "Thanks. Can you spell the name of that city for me?"]


def sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s])


def test_demo_holds_a_three_question_conversation(tmp_path: Path) -> None:
    """Three questions, one call: three turns (the pause inside "Thanks. Can you..." does not split it),
    each reply at most two sentences, each row of the waterfall measured."""
    args = [a for q in CONVERSATION for a in ("--say", q)]
    result = parse(run_demo("--json", *args, "--gap", "0.8", "--out", str(tmp_path), timeout=420))
    rows = result["turns"]
    assert [r["question"] for r in rows] == [1, 2, 3], result
    assert result["turns_answered"] == 3, result
    for question, row in zip(CONVERSATION, rows):
        assert wer(question, row["user_transcript"]) <= 0.25, row
        assert row["agent_text"] and sentences(row["agent_text"]) <= 2, row
        assert row["voice_to_voice_ms"] > row["response_ms"] > 0, row
    assert len({r["turn"] for r in rows}) == 3
    assert (tmp_path / "transcript.txt").read_text().count("caller: ") == 3


def test_demo_keeps_the_first_word_under_noise(tmp_path: Path) -> None:
    """Pink noise 15 dB below the speech: the transcript keeps "Could", and voice-to-voice is measured
    from the clean input's end of speech (so it stays larger than the response time)."""
    result = parse(run_demo("--json", "--say", "Could you recommend a good book for a long train ride?",
                            "--noise", "15", "--out", str(tmp_path)))
    assert result["noise_snr_db"] == 15.0
    assert result["user_transcript"].lower().startswith("could"), result
    assert result["voice_to_voice_ms"] > result["response_ms"] > 0, result


def test_demo_barge_in_leaves_no_stale_frames(tmp_path: Path) -> None:
    result = parse(run_demo("--json", "--barge-in-at", "0.8", "--out", str(tmp_path)))
    assert result["stale_frames"] == 0, result
    assert 0 <= result["barge_in_silence_ms"] < 1000, result
    heard = result["heard_text"].split()
    # the context keeps only what was heard: a strict prefix of what was generated
    assert heard == result["agent_text"].split()[: len(heard)], result
    assert len(heard) < len(result["agent_text"].split()), result


def test_demo_names_a_worker_that_cannot_start(tmp_path: Path) -> None:
    pools = (ROOT / "ops/pools/cpu.toml").read_text().replace(
        'model = "bundled:whisper-tiny.en"', f'model = "{tmp_path}/no-such-model"')
    bad = tmp_path / "bad.toml"
    bad.write_text(pools)
    proc = run_demo("--json", "--pools", str(bad), timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "asr worker (pool asr-cpu)" in proc.stderr and "no-such-model" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--help"])
def test_up_and_demo_are_documented_commands(flag: str) -> None:
    for cmd in ("demo", "up"):
        out = subprocess.run([sys.executable, "-m", "shared.cli", cmd, flag], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "--pools" in out.stdout
