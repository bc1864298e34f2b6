"""Sums of Prometheus samples, for tests that check a counter moved."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY


def sample_sum(families: Iterable[Any], name: str, **labels: str) -> float:
    """Sum of the samples called `name` (e.g. "voxbus_bus_rejected_total") whose labels include `labels`."""
    return sum(sample.value for family in families for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def local_counter(name: str, **labels: str) -> float:
    """The same over this process's own registry (code under test running in the test process)."""
    return sample_sum(REGISTRY.collect(), name, **labels)


def label_values(name: str, label: str, **match: str) -> set[str]:
    """Every value `label` takes in this process's samples of `name` whose labels include `match`."""
    return {
        sample.labels[label]
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items())
    }
