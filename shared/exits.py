"""Process exit codes in words: which signal killed a child, and what that usually means.

`voxbus demo`, `voxbus up` and the tests start workers as child processes; a
negative return code is the signal that killed one. A bare "-4" tells a user
nothing, so the common fatal signals carry their likely cause and what to do.
"""

from __future__ import annotations

import signal

REBUILD_HINT = "./ops/dev rebuild-llama"

_CAUSES: dict[int, str] = {
    signal.SIGILL: (
        "an illegal instruction: a native library (most often llama-cpp-python, compiled with "
        "-march=native on another CPU, or a wheel from a cache) uses CPU instructions this machine "
        f"lacks. Rebuild it portably with `{REBUILD_HINT}`"
    ),
    signal.SIGSEGV: "a segmentation fault in native code (a model file that does not match its engine, or a library bug)",
    signal.SIGBUS: "a bus error (a model file truncated or changed while it was mapped)",
    signal.SIGFPE: "a floating-point exception in native code",
    signal.SIGABRT: "an abort in native code (a failed assertion; its message is in the output above)",
    signal.SIGKILL: "SIGKILL, often the kernel's out-of-memory killer (see `dmesg`) or an operator",
}


def signal_name(returncode: int) -> str | None:
    """`SIGILL` for -4; None for a normal exit code."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def describe_exit(returncode: int) -> str:
    """`exited with code 3`, or `was killed by SIGILL (an illegal instruction: ...)`."""
    name = signal_name(returncode)
    if name is None:
        return f"exited with code {returncode}"
    cause = _CAUSES.get(-returncode)
    return f"was killed by {name} ({cause})" if cause else f"was killed by {name}"
