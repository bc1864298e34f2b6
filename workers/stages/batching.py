"""Batching across jobs: the inputs of jobs that reach a stage in the same event-loop tick run as
one engine call, in a thread, and each job gets its own result back.

A GPU model costs about the same for 1 input as for 8, so concurrent jobs (a pool's slots, many
sessions) share calls. Inputs whose `key` differs never share one: the ASR stage keys by language,
since a batched transcription detects or takes one language for the whole batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    def __init__(self, run_batch: Callable[[list[In]], Sequence[Out]], *, key: Callable[[In], Hashable] | None = None,
                 max_size: int = 16) -> None:
        self._run_batch = run_batch
        self._key = key or (lambda _item: None)
        self.max_size = max_size
        self._waiting: list[tuple[In, asyncio.Future[Out]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: In) -> Out:
        fut: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="batcher")
        return await fut

    async def aclose(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # let jobs that started in the same tick join the batch
        while self._waiting:
            key = self._key(self._waiting[0][0])
            batch = [w for w in self._waiting if self._key(w[0]) == key][: self.max_size]
            taken = {id(fut) for _, fut in batch}
            self._waiting = [w for w in self._waiting if id(w[1]) not in taken]
            try:
                results = await asyncio.to_thread(self._run_batch, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the engine returned {len(results)} results for a batch of {len(batch)}")
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
