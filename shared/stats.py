"""The one percentile voxbus reports everywhere (the workers' registry records, `voxbus top`, every
benchmark): numpy's linear interpolation between the closest ranks, so figures from different tools
agree. None for no values."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def percentile(values: Iterable[float] | np.ndarray, q: float, *, digits: int | None = 3) -> float | None:
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    if arr.size == 0:
        return None
    value = float(np.percentile(arr, q))
    return round(value, digits) if digits is not None else value
