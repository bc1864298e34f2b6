"""Hand-over of decoded text from a producer (a decode thread, an HTTP reader, an engine
pump) to the consuming async generator, ended at once by a cancel watch.

The producer puts text deltas, an exception (re-raised to the consumer) or END.
A fired watch wakes a consumer that is waiting for the next delta, so a cancel
during a silent stretch (prefill, queueing, a long step) is acted on at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Literal

from shared.cancel import CancelWatch

END = object()
StreamEnd = Literal["completed", "cancelled", "error", "closed"]


class DeltaStream:
    def __init__(self, watch: CancelWatch | None) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.watch = watch
        self.outcome: StreamEnd = "closed"  # until the consumer saw the end, a cancel or an error

    def put(self, item: Any) -> None:
        """A text delta, an exception or END (event-loop thread only)."""
        self.queue.put_nowait(item)

    async def items(self) -> AsyncGenerator[str, None]:
        waiter = asyncio.ensure_future(self.watch.wait()) if self.watch is not None else None
        if waiter is not None:
            waiter.add_done_callback(lambda _: self.queue.put_nowait(END))
        try:
            while True:
                item = await self.queue.get()
                if self.watch is not None and self.watch.cancelled:
                    self.outcome = "cancelled"
                    return
                if item is END:
                    self.outcome = "completed"
                    return
                if isinstance(item, BaseException):
                    self.outcome = "error"
                    raise item
                yield item
        finally:
            if waiter is not None:
                waiter.cancel()
