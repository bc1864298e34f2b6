"""The `voxbus` command: one entry point, one subcommand per job.

Subcommands are imported only when run, so `voxbus worker` on a GPU image
never imports the WebRTC stack and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, help). Each module exposes `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "selfcheck": ("shared.selfcheck", "check the bus end to end against Redis (embedded if no REDIS_URL)"),
    "demo": ("shared.selfcheck", "run the main job (until the bridge lands: the bus self-check)"),
    "worker": ("workers.cli", "run one pool's worker process (ASR, LLM or TTS)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxbus", description="Real-time voice agents over Redis Streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
