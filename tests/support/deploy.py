"""What the compose and Kubernetes tests both check: which pools need GPUs, and that a container's
`voxbus ...` command is one the real CLI accepts."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex

import pytest

from shared.cli import COMMANDS, parse_args
from shared.config import PoolConfig


def needs_gpu(pool: PoolConfig) -> bool:
    """A pool whose worker runs its model in-process on a GPU (an `openai` pool only calls a server)."""
    return pool.gpu_type != "cpu" and pool.engine != "openai"


def gpus_needed(pool: PoolConfig) -> int:
    return int(pool.options.get("tensor_parallel_size", 1)) if needs_gpu(pool) else 0


def parse_voxbus(argv: list[str]) -> argparse.Namespace:
    """Parse `voxbus ...` with the real parser; fail with argparse's message if it refuses."""
    assert argv and argv[0] == "voxbus", argv
    assert len(argv) > 1 and argv[1] in COMMANDS, (
        f"`{shlex.join(argv)}`: {argv[1] if len(argv) > 1 else '(none)'!r} is not a voxbus subcommand "
        f"(have: {', '.join(COMMANDS)})")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args(argv[1:])
    except SystemExit:
        message = err.getvalue().strip().splitlines() or ["(no message)"]
        pytest.fail(f"`{shlex.join(argv)}` is refused by the voxbus CLI: {message[-1]}")
