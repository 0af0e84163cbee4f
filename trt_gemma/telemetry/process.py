"""This process's host memory: resident set size now and at its peak.

Peak RSS is what bounds a unified-memory device (Jetson): TensorRT-Edge-LLM's memory monitor reports
`getrusage(RUSAGE_SELF).ru_maxrss` on iGPUs for the same reason (docs/facts/serving-telemetry.md §4).
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any

from trt_gemma.telemetry.fields import UNAVAILABLE


def read_process(pid: int | None = None) -> dict[str, Any]:
    """{"pid", "rss_bytes", "peak_rss_bytes", "threads"} for `pid` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    status = _proc_status(pid)
    rss = status.get("VmRSS", UNAVAILABLE)
    peak = status.get("VmHWM", UNAVAILABLE)
    if rss == UNAVAILABLE or peak == UNAVAILABLE:
        rss, peak = _fallback(pid, rss, peak)
    return {"pid": pid, "rss_bytes": rss, "peak_rss_bytes": peak, "threads": status.get("Threads", UNAVAILABLE)}


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB -> bytes) and Threads from /proc/<pid>/status (Linux)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key in ("VmRSS", "VmHWM") and parts:
            out[key] = int(parts[0]) * 1024
        elif key == "Threads" and parts:
            out[key] = int(parts[0])
    return out


def _fallback(pid: int, rss, peak):
    """Non-Linux: psutil for RSS, getrusage for our own peak (ru_maxrss is kB on Linux, bytes on macOS)."""
    try:
        import psutil

        rss = psutil.Process(pid).memory_info().rss if rss == UNAVAILABLE else rss
    except Exception:  # psutil missing or the pid is gone: report, don't crash
        pass
    if peak == UNAVAILABLE and pid == os.getpid():
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    return rss, peak
