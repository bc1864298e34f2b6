"""The `voxbus` command: one entry point, one subcommand per job.

Only the subcommand being run is imported (its arguments too are defined in
its own module), so `voxbus worker` on a GPU image never imports the WebRTC
stack and vice versa; tests/test_cli.py checks that.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

# Before anything imports numpy: its OpenBLAS starts a thread per core, and after each matrix
# product those threads spin-wait on the other cores. Measured on 2 cores: a Smart Turn decision
# (one 80x201 by 201x800 product in its features) cost 100 ms of CPU for 50 ms of wall time, and an
# ASR running beside it went from 92 to 161 ms. The engines have their own thread pools; numpy's
# products here are small. OPENBLAS_NUM_THREADS set by the user wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from redis.exceptions import RedisError

# name -> (module, help). Each module exposes `add_arguments(parser)` and `run(args) -> int`;
# "module:x" names `add_x_arguments` / `run_x` instead (several commands in one module).
COMMANDS: dict[str, tuple[str, str]] = {
    "selfcheck": ("shared.admin.selfcheck", "check the bus end to end against Redis (embedded if no REDIS_URL)"),
    "demo": ("bridge.demo", "run the whole stack and a simulated caller; print the latency waterfall"),
    "up": ("bridge.demo:up", "run Redis, a worker per pool of the pools file and the bridge with its page (Ctrl-C stops)"),
    "worker": ("workers.cli", "run one pool's worker process (ASR, LLM, TTS or end of turn)"),
    "bridge": ("bridge.cli", "run a bridge with the direct WebRTC transport and its caller page"),
    "exporter": ("shared.admin.exporter", "export per-pool queue depth, lag and workers to Prometheus"),
    "top": ("shared.admin.top", "live terminal view of pools, workers, queues and sessions"),
    "record": ("shared.admin.recording", "export a session (its streams and context) to one file"),
    "sessions": ("shared.admin.recording:sessions", "list recent sessions with duration, turns and outcome"),
    "archive": ("shared.admin.archive_cli", "archive sessions now (a live one as a snapshot), or --sweep every ended one"),
    "replay": ("bridge.replay", "replay a recorded session against today's workers and compare turn by turn"),
    "inspect": ("shared.admin.inspect", "write one session (or a recording) as a self-contained HTML timeline"),
}


def _entry(target: str, pattern: str) -> Any:
    module, _, suffix = target.partition(":")
    name = pattern.format(f"{suffix}_" if suffix else "").rstrip("_")
    return getattr(importlib.import_module(module), name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to define its arguments (None: none is)."""
    parser = argparse.ArgumentParser(prog="voxbus", description="Real-time voice agents over Redis Streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            _entry(module, "add_{}arguments")(p)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`argv` (without the program name) parsed as `voxbus` parses it: the command's arguments included."""
    return build_parser(_command_of(argv)).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(_entry(args._module, "run_{}")(args) or 0)
    except KeyboardInterrupt:
        return 130
    except RedisError as exc:  # wrong password, missing ACL permission, Redis down: one line, no traceback
        print(f"voxbus {args.command}: {redis_error_text(exc)}", file=sys.stderr)
        return 2


def redis_error_text(exc: BaseException) -> str:
    from redis.exceptions import AuthenticationError, NoPermissionError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from .redis_conn import redact_url, redis_url_from_env

    url = redact_url(redis_url_from_env() or "")
    if isinstance(exc, AuthenticationError):
        return f"Redis at {url} refused the credentials ({exc}); check the user and password in REDIS_URL"
    if isinstance(exc, NoPermissionError):
        return f"the Redis user lacks a permission voxbus needs ({exc}); README \"Redis ACL\" lists them"
    if isinstance(exc, RedisConnectionError):
        return f"cannot reach Redis at {url} ({exc})"
    return f"Redis error: {type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
