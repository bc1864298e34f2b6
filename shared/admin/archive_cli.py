"""`voxbus archive`: archive sessions now (a live call as a snapshot), or sweep every call that is over.

The work is shared/admin/archiving.py's; this is its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from .archive import ArchiveError
from .archiving import ORPHAN_AFTER_S, Outcome, archive_session, call_is_over, sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sessions", nargs="*", metavar="SESSION",
                   help="sessions to archive now (an ended one for good, a live one as a snapshot)")
    p.add_argument("--sweep", action="store_true", help="archive every ended or orphaned session not archived yet")
    p.add_argument("--archive", metavar="URL", help="the archive (default: $VOXBUS_ARCHIVE_URL, else the pools file's)")
    p.add_argument("--retention", type=float, metavar="S",
                   help="seconds an archived session's keys stay in Redis (default: the pools file's retention_s)")
    p.add_argument("--orphan-after", type=float, default=ORPHAN_AFTER_S, metavar="S",
                   help=f"a call whose bridge is gone counts as over after S seconds without caller audio "
                        f"(default {ORPHAN_AFTER_S:g})")
    p.add_argument("--pools", help="pools TOML file (default: $VOXBUS_POOLS, else ops/pools/cpu.toml)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--json", action="store_true", help="one JSON object per session")


async def _main(args: argparse.Namespace) -> int:
    import os
    import socket

    from ..config import ARCHIVE_URL_ENV, load_config
    from ..redis_conn import connect, redis_url_from_env
    from .archive import open_archive

    config = load_config(args.pools)
    url = args.archive or os.environ.get(ARCHIVE_URL_ENV) or config.bridge.archive_url
    if not url:
        print("voxbus archive: no archive configured: --archive URL, $VOXBUS_ARCHIVE_URL or [bridge] archive_url")
        return 2
    if not args.sweep and not args.sessions:
        print("voxbus archive: name sessions, or --sweep")
        return 2
    archive = open_archive(url)
    retention_s = args.retention if args.retention is not None else config.bridge.retention_s
    who = f"cli-{socket.gethostname()[:24]}-{os.getpid()}"
    redis = connect(args.redis_url or redis_url_from_env())
    try:
        results = (await sweep(redis, archive, retention_s=retention_s, who=who, orphan_after_s=args.orphan_after)
                   if args.sweep else [])
        for sid in args.sessions:
            final = await call_is_over(redis, sid, args.orphan_after)
            results.append(await archive_session(redis, archive, sid, retention_s=retention_s, who=who, final=final))
    finally:
        await redis.aclose()
    for r in results:
        if args.json:
            print(json.dumps({"session": r.session, "outcome": str(r.outcome), "bytes": r.bytes,
                              "seconds": round(r.seconds, 3), "error": r.error}))
        else:
            print(f"{r.session}: {r.outcome}" + (f" ({r.bytes / 1024:.0f} KiB)" if r.bytes else "")
                  + (f": {r.error}" if r.error else ""))
    if args.sweep and not args.json:
        print(f"swept: {len(results) - len(args.sessions)} session(s) due, archive {archive.url}")
    return 1 if any(r.outcome is Outcome.FAILED for r in results) else 0


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    try:
        return asyncio.run(_main(args))
    except (ConfigError, ArchiveError) as exc:
        print(f"voxbus archive: {exc}")
        return 2
