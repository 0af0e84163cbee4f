"""One telemetry snapshot: every source this host has, chosen by detection, as a JSON-able dict.

Reading is side-effect free (nothing is drained, unlike trtllm-serve's /metrics), so /v1/telemetry, /metrics and
`trt-gemma telemetry --watch` can all poll it. `memory_bytes` is the summary the Prometheus gauge exports:

  weights           bytes of the model weights as loaded by the backend
  kv_cache          bytes held by live KV caches right now (the backend's accounting)
  device_used       dGPU: NVML v2 `used` of device 0; Jetson: NvMapMemUsed (GPU-shared memory) when the kernel has it
  device_total      dGPU: NVML `total`; Jetson: MemTotal (CPU and GPU share it)
  host_rss          this process's resident set
  unified_available Jetson only: MemAvailable (not MemFree, which counts reclaimable page cache as used)
  guard_weights     bytes of the safety guard's weights (`serve --guard`, serve/guard.py); absent without a guard
  engine            a device runtime's deserialized engine (TensorRT: measured around deserialization)
  activations       a device runtime's context and step buffers
  (engine, activations and a device kv_cache come from the backend's `device_memory()` where it has one: the
  TensorRT executor's `memory_bytes()`, its real allocations)

A kind whose source is absent is "unavailable" (the Prometheus collector then omits it rather than exporting 0).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from trt_gemma.telemetry.fields import UNAVAILABLE, available
from trt_gemma.telemetry.jetson import is_jetson, read_jetson
from trt_gemma.telemetry.nvml import read_nvml
from trt_gemma.telemetry.process import read_process

MEMORY_KINDS = ("weights", "kv_cache", "device_used", "device_total", "host_rss", "unified_available",
                "guard_weights", "engine", "activations")


def snapshot(backend=None, root: Path = Path("/")) -> dict[str, Any]:
    root = Path(root)
    jetson = is_jetson(root)
    snap: dict[str, Any] = {
        "timestamp": time.time(),
        "host": {"platform": "jetson" if jetson else platform.system().lower(), "machine": platform.machine()},
        "process": read_process(),
        "nvml": read_nvml(),
    }
    if jetson:
        snap["jetson"] = read_jetson(root)
    if backend is not None:
        snap["model"] = _model(backend)
    snap["memory_bytes"] = _memory_summary(snap)
    return snap


def _model(backend) -> dict[str, Any]:
    mem, kv = backend.memory(), backend.kv_usage()
    device = getattr(backend, "device_memory", None)
    return {"device_memory": device() if device else None,
        "backend": backend.name, "name": backend.info.name, "context_length": backend.info.context_length,
        "weights_bytes": mem.weights_bytes,
        "kv_cache": {"capacity_tokens": kv.capacity_tokens, "used_tokens": kv.used_tokens,
                     "bytes_per_token": kv.bytes_per_token, "capacity_bytes": kv.capacity_bytes,
                     "used_bytes": kv.used_bytes, "usage_perc": kv.usage_perc},
    }


def _memory_summary(snap: dict[str, Any]) -> dict[str, Any]:
    out = dict.fromkeys(MEMORY_KINDS, UNAVAILABLE)
    out["host_rss"] = snap["process"]["rss_bytes"]
    if "model" in snap:
        out["weights"] = snap["model"]["weights_bytes"]
        out["kv_cache"] = snap["model"]["kv_cache"]["used_bytes"]
        for kind, nbytes in (snap["model"]["device_memory"] or {}).items():  # allocated on the device, by kind
            out[kind] = nbytes
    devices = snap["nvml"].get("devices") or []
    if devices and "memory" in devices[0]:
        out["device_used"] = devices[0]["memory"]["used"]
        out["device_total"] = devices[0]["memory"]["total"]
    if "jetson" in snap:
        mi = snap["jetson"]["meminfo"]
        out["unified_available"] = mi["mem_available"]
        if not available(out["device_total"]):  # NVML reports NotSupported for memory on Orin
            out["device_total"] = mi["mem_total"]
        if not available(out["device_used"]):
            out["device_used"] = mi["nvmap_used"]
    return out
