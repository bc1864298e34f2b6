"""Logging that cannot flood: the first occurrence of a condition at once, then one summary line per interval.

During an outage the same failure repeats per frame, per job, per session (a
Redis refusing writes: ~7,600 lines in 20 s for one call before this). A
`RateLimitedLog` logs a key's first occurrence, counts the repeats and writes
one line with the count at most every `interval_s`, never a traceback.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log `msg` under `key` unless this key logged less than `interval_s` ago; True if it did."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        repeats = self._suppressed.pop(key, 0)
        self._last[key] = now
        if len(self._last) > 1000:  # keys are reasons, not ids, but stay bounded whatever a caller passes
            self._last = {key: now}
        if repeats:
            msg += " (%d more since the last such line)"
            args = (*args, repeats)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def exception(self, key: str, msg: str, *args: object) -> bool:
        """An unexpected failure (a bug): with its traceback, once per interval."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)
