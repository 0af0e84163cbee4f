"""Shared conventions for telemetry readers: a field we could not read is "unavailable", never 0 and never a crash.

Every reader returns plain JSON-able dicts. `UNAVAILABLE` marks a field the source does not support on this host
(NVML NotSupported on Jetson, a sysfs file missing, no permission); consumers such as the Prometheus collector skip it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

UNAVAILABLE = "unavailable"


def available(value: Any) -> bool:
    return value is not None and value != UNAVAILABLE


def read_text(path: Path) -> str | None:
    """File contents stripped of whitespace and the NUL that device-tree strings end with; None if unreadable."""
    try:
        return path.read_text(errors="replace").strip().strip("\x00").strip()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    """First integer in a sysfs file (some append units, e.g. "32760 ma"); None if absent or not a number."""
    text = read_text(path)
    if not text:
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def guarded(fn: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
    """fn() or UNAVAILABLE when it raises one of `errors` (a per-field guard: one failing query spoils nothing else)."""
    try:
        value = fn()
    except errors:
        return UNAVAILABLE
    return UNAVAILABLE if value is None else value
