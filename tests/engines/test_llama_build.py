"""The llama.cpp build ops/dev installs runs here: a real generation in a child process, and run-time kernels.

A library compiled for another CPU dies by a signal (SIGILL) on the first
prompt longer than one token, so the generation runs in a subprocess and a
crash fails the test with the signal's name instead of taking pytest down.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import parse_config
from shared.exits import describe_exit, signal_name
from workers.llm.ggml_cpu import VARIANTS, best_variant

ROOT = Path(__file__).resolve().parents[2]
ALL = set(VARIANTS)


def test_a_multi_token_generation_runs_in_a_child_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "workers.llm.llama_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    if proc.returncode < 0:
        pytest.fail(f"llama.cpp generation was killed by {signal_name(proc.returncode)}: "
                    f"{describe_exit(proc.returncode)}\n{proc.stderr[-3000:]}", pytrace=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok: ") and "generated tokens" in proc.stdout, proc.stdout


def test_kernels_follow_the_flags_the_kernel_reports() -> None:
    avx2 = frozenset("sse4_2 avx f16c fma avx2 bmi2".split())
    avx512 = avx2 | frozenset("avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16".split())
    assert best_variant(frozenset({"sse2"}), ALL) == "x64"
    assert best_variant(avx2, ALL) == "haswell"
    assert best_variant(avx2 | {"avx_vnni"}, ALL) == "alderlake"
    assert best_variant(avx512, ALL) == "zen4"
    # AMX is taken only when Linux shows it (it clears the flags when the OS has not enabled AMX state)
    assert best_variant(avx512 | {"amx_tile", "amx_int8"}, ALL) == "sapphirerapids"
    assert best_variant(avx512, ALL - {"zen4", "cooperlake"}) == "icelake"
    assert best_variant(avx2, {"skylakex"}) is None


def test_signals_are_named_with_their_likely_cause() -> None:
    assert describe_exit(3) == "exited with code 3"
    ill = describe_exit(-4)
    assert ill.startswith("was killed by SIGILL") and "another CPU" in ill and "./ops/dev rebuild-llama" in ill
    assert "out-of-memory" in describe_exit(-9)


async def test_the_stack_names_the_signal_that_killed_a_worker(tmp_path: Path, redis_url: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies by SIGILL while starting: the demo's error says so in words."""
    from bridge import stack

    dies = tmp_path / "python"
    dies.write_text("#!/bin/sh\necho 'loading llama.cpp model'\nkill -ILL $$\n")
    dies.chmod(dies.stat().st_mode | stat.S_IEXEC)
    config = parse_config({"pools": {"llm-x": {"stage": "llm", "engine": "synthetic"}}}, "test.toml")
    monkeypatch.setattr(stack.sys, "executable", str(dies))
    with pytest.raises(stack.StackError) as err:
        await asyncio.wait_for(stack.start_workers(redis_url, config, None, only=["llm-x"], check=False), 30)
    text = str(err.value)
    assert "the llm worker (pool llm-x) was killed by SIGILL" in text and "rebuild-llama" in text, text
    assert "loading llama.cpp model" in text, text
