"""Lazy plugin registries: an engine is named in config, imported only when used."""

from __future__ import annotations

import importlib
from typing import Any


class UnknownEngine(ValueError):
    pass


def load_engine(registry: dict[str, str], kind: str, name: str, options: dict[str, Any]) -> Any:
    """Instantiate engine `name` from `registry` ("module:Class") with `options` as keyword args."""
    target = registry.get(name)
    if target is None:
        raise UnknownEngine(f"unknown {kind} engine {name!r}; available: {', '.join(sorted(registry))}")
    module, _, cls = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise UnknownEngine(
            f"{kind} engine {name!r} needs a package that is not installed ({exc.name}): "
            f"install the matching voxbus extra"
        ) from exc
    try:
        return factory(**options)
    except TypeError as exc:
        raise UnknownEngine(f"{kind} engine {name!r}: bad options {sorted(options)}: {exc}") from None
