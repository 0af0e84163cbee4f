"""GPU telemetry through NVML (package nvidia-ml-py, imported as `pynvml`).

Facts used (docs/facts/serving-telemetry.md §3, nvidia-ml-py pynvml.py, docs.nvidia.com/deploy/nvml-api):
- memory info v2 (`nvmlDeviceGetMemoryInfo(h, version=nvmlMemory_v2)`, driver >= 510.39) gives total/reserved/free/used
  and matches nvidia-smi; older drivers raise FunctionNotFound, so we fall back to v1 (no `reserved`).
- power is reported in milliwatts; temperature through `nvmlDeviceGetTemperatureV` (the plain call is deprecated in
  CUDA 13.0, removed in 14.0), falling back to the old call where V is missing.
- No driver/library (CI, laptops) -> nvmlInit raises NVMLError_LibraryNotFound; on Jetson Orin most queries raise
  NotSupported. Both become "unavailable" per field: never 0, never a crash.
"""
from __future__ import annotations

import os
from typing import Any

from trt_gemma.telemetry.fields import UNAVAILABLE, guarded


def _import_pynvml():
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def read_nvml(pid: int | None = None) -> dict[str, Any]:
    """{"available": bool, "reason": str|None, "driver_version", "devices": [per-device dict]}; never raises."""
    nv = _import_pynvml()
    if nv is None:
        return {"available": False, "reason": "nvidia-ml-py is not installed", "devices": []}
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        return {"available": False, "reason": f"NVML unavailable: {e}", "devices": []}
    try:
        pid = os.getpid() if pid is None else pid
        count = guarded(nv.nvmlDeviceGetCount, (nv.NVMLError,))
        devices = [] if count == UNAVAILABLE else [_device(nv, i, pid) for i in range(count)]
        driver = guarded(nv.nvmlSystemGetDriverVersion, (nv.NVMLError,))
        return {"available": True, "reason": None, "driver_version": _str(driver), "devices": devices}
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass


def _device(nv, index: int, pid: int) -> dict[str, Any]:
    errs = (nv.NVMLError,)
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
    except nv.NVMLError as e:
        return {"index": index, "error": str(e)}
    util = guarded(lambda: nv.nvmlDeviceGetUtilizationRates(h), errs)
    power_mw = guarded(lambda: nv.nvmlDeviceGetPowerUsage(h), errs)
    return {
        "index": index,
        "name": _str(guarded(lambda: nv.nvmlDeviceGetName(h), errs)),
        "memory": _memory(nv, h),
        "process_memory_bytes": guarded(lambda: _process_memory(nv, h, pid), errs),
        "utilization_gpu_percent": UNAVAILABLE if util == UNAVAILABLE else util.gpu,
        "utilization_memory_percent": UNAVAILABLE if util == UNAVAILABLE else util.memory,
        "power_mw": power_mw,
        "temperature_c": guarded(lambda: _temperature(nv, h), errs),
    }


def _memory(nv, h) -> dict[str, Any]:
    """v2 first (reserved, nvidia-smi-consistent used), v1 when the driver predates it."""
    try:
        m = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
        return {"total": m.total, "reserved": m.reserved, "used": m.used, "free": m.free, "version": 2}
    except (nv.NVMLError_FunctionNotFound, AttributeError, TypeError):
        pass
    except nv.NVMLError:
        return {"total": UNAVAILABLE, "reserved": UNAVAILABLE, "used": UNAVAILABLE, "free": UNAVAILABLE,
                "version": UNAVAILABLE}
    try:
        m = nv.nvmlDeviceGetMemoryInfo(h)
    except nv.NVMLError:
        return {"total": UNAVAILABLE, "reserved": UNAVAILABLE, "used": UNAVAILABLE, "free": UNAVAILABLE,
                "version": UNAVAILABLE}
    return {"total": m.total, "reserved": UNAVAILABLE, "used": m.used, "free": m.free, "version": 1}


def _process_memory(nv, h, pid: int) -> int | None:
    """Bytes NVML attributes to `pid` (WDDM and some Jetsons report None = not available)."""
    procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
    mine = [p.usedGpuMemory for p in procs if p.pid == pid]
    if not mine:
        return 0 if procs is not None else None  # NVML lists processes and ours holds no device memory
    if any(v is None for v in mine):
        return None
    return sum(mine)


def _temperature(nv, h) -> int:
    getter = getattr(nv, "nvmlDeviceGetTemperatureV", None)
    if getter is not None:
        try:
            return getter(h, nv.NVML_TEMPERATURE_GPU)
        except nv.NVMLError_FunctionNotFound:
            pass  # driver older than the V entry point
    return nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)


def _str(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
