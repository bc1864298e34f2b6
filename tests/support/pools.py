"""Pools files for tests: TOML text from dicts, and ops/pools/cpu.toml under unique pool names.

Tests share one Redis, so each test (or suite) renames the CPU pools with a
suffix of its own; its workers and jobs then never meet another test's.
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

from shared.config import DEFAULT_POOLS_FILE


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def pools_toml(pools: dict[str, dict[str, Any]]) -> str:
    """A pools file with exactly these `[pools.NAME]` tables."""
    lines: list[str] = []
    for name, table in pools.items():
        lines.append(f'[pools."{name}"]')
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def renamed_cpu_pools_toml(suffix: str) -> str:
    """ops/pools/cpu.toml with every pool renamed `<name>-<suffix>` (fallbacks dropped)."""
    data = tomllib.loads(DEFAULT_POOLS_FILE.read_text())
    lines = ["[defaults]"]
    lines += [f"{stage} = {toml_value(f'{pool}-{suffix}')}" for stage, pool in data.get("defaults", {}).items()]
    for name, pool in data["pools"].items():
        lines.append(f"\n[pools.{name}-{suffix}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in pool.items() if k != "fallback"]
    if data.get("bridge"):
        lines.append("\n[bridge]")
        lines += [f"{k} = {toml_value(v)}" for k, v in data["bridge"].items()]
    return "\n".join(lines) + "\n"
