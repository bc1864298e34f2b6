"""Stopping asyncio tasks for sure (redis-py can swallow a cancellation mid-command)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
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


class TaskSet:
    """Every background task of one component, tracked, with vital ones supervised.

    `spawn(coro, name)` keeps a reference (so a task is never garbage-collected
    mid-flight) and logs a failure once the task ends. A task spawned with
    `vital=True` must run until `aclose()`: if it ends before (an exception its
    loop did not catch, or a return), `failed` is set and `failure` says why, so
    the component stops and its process exits non-zero for the orchestrator to
    restart it, instead of running on without a heartbeat or a reader.
    """

    def __init__(self, component: str) -> None:
        self.component = component
        self._tasks: set[asyncio.Task[Any]] = set()
        self._vital: set[asyncio.Task[Any]] = set()
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self._closing = False

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))  # a copy: tasks end (and leave the set) while the caller iterates

    def spawn(self, coro: Any, name: str, *, vital: bool = False) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.component}-{name}")
        self._tasks.add(task)
        if vital:
            self._vital.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        vital = task in self._vital
        self._vital.discard(task)
        if task.cancelled():
            if vital and not self._closing:
                self._fail(task, "was cancelled")
            return
        exc = task.exception()
        if vital and not self._closing:
            self._fail(task, f"failed: {exc!r}" if exc is not None else "returned")
        elif exc is not None:
            log.warning("%s: background task %s failed: %r", self.component, task.get_name(), exc)

    def _fail(self, task: asyncio.Task[Any], how: str) -> None:
        self.failure = self.failure or f"vital task {task.get_name()} {how}"
        log.critical("%s: %s; stopping so that it is restarted", self.component, self.failure,
                     exc_info=task.exception() if not task.cancelled() else None)
        self.failed.set()

    def shutting_down(self) -> None:
        """A shutdown has begun: vital tasks that end from now on (a loop seeing its stop event)
        are no failure."""
        self._closing = True

    def cancel_others(self) -> None:
        """Cancel every task but the one running this (a task may end the component it belongs to)."""
        self._closing = True
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Stop every task (vital ones included), waiting up to `grace_s` for each to end by itself."""
        self._closing = True
        for task in list(self._tasks):
            await finish_task(task, grace_s=grace_s)
