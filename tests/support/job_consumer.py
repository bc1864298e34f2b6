"""A job consumer in its own process, for crash tests.

Reads jobs from a pool through `JobQueue` until it holds `--hold` of them, prints
their entry ids as one JSON line, then sits on them without acking until it is
killed. Usage: python job_consumer.py URL POOL CONSUMER --hold N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from shared.jobs import JobQueue
from shared.redis_conn import connect


async def main(url: str, pool: str, consumer: str, hold: int) -> None:
    redis = connect(url)
    queue = JobQueue(redis, pool, consumer, stage="asr")
    await queue.ensure_group()
    held: list[str] = []
    while len(held) < hold:
        held += [d.entry_id for d in await queue.read(count=hold - len(held), block_ms=200)]
    print(json.dumps({"held": held}), flush=True)
    await asyncio.Event().wait()  # "working" forever: never acks


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("pool")
    parser.add_argument("consumer")
    parser.add_argument("--hold", type=int, default=5)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.url, args.pool, args.consumer, args.hold))
    except KeyboardInterrupt:
        sys.exit(130)
