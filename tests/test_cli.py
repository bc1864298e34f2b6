"""The `voxbus` command imports only what the subcommand run needs.

A GPU worker image has no WebRTC stack: importing the worker's command path
(the CLI, the worker runtime, every stage handler and the shared kernel) must
not import aiortc, av (PyAV) or aiohttp. Checked in a fresh interpreter, since
this test process has them loaded already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from shared.cli import build_parser
build_parser("worker").parse_args(["worker", "--pool", "x"])
import workers.cli, workers.runtime
import workers.stages.asr, workers.stages.llm, workers.stages.tts, workers.stages.eot
import shared.bus, shared.jobs, shared.cancel, shared.routing, shared.registry, shared.config
loaded = sorted(m for m in ("aiortc", "av", "aiohttp", "bridge") if m in sys.modules)
print(",".join(loaded))
"""


def test_the_worker_command_path_imports_no_webrtc_stack() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"the worker path imported {out.stdout.strip()}"


def test_help_lists_every_command_without_importing_them() -> None:
    code = ("import sys; from shared.cli import build_parser; build_parser().format_help(); "
            "print(','.join(m for m in ('bridge.demo', 'workers.cli', 'shared.admin.exporter') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
    help_text = subprocess.run([sys.executable, "-m", "shared.cli", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60).stdout
    for command in ("worker", "bridge", "demo", "up", "exporter", "top", "record", "replay", "sessions", "selfcheck"):
        assert command in help_text


def test_the_command_keeps_numpys_blas_to_one_thread() -> None:
    """shared/cli.py sets OPENBLAS_NUM_THREADS=1 before numpy loads (spinning BLAS threads took the
    cores the stages need); a value the user set wins."""
    code = "import shared.cli, os; print(os.environ['OPENBLAS_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.strip() == "1", out.stderr
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**env, "OPENBLAS_NUM_THREADS": "4"})
    assert out.stdout.strip() == "4", out.stderr
