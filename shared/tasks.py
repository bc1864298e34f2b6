"""Stopping asyncio tasks for sure (redis-py can swallow a cancellation mid-command)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("voxbus.tasks")


async def finish_task(task: asyncio.Future[Any], grace_s: float, *, attempts: int = 40, interval_s: float = 0.05) -> None:
    """Let `task` end by itself for `grace_s`, then cancel it, again and again, until it ends.

    One cancel is not enough: redis-py may swallow it mid-command, and the task
    then runs on (a loop) or waits for something that never comes.
    """
    if grace_s > 0:
        await asyncio.wait({task}, timeout=grace_s)
    for _ in range(attempts):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=interval_s)
    if task.done():
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task %s failed: %r", task, task.exception())
    else:
        log.warning("background task %s ignored %d cancellations; leaving it", task, attempts)
