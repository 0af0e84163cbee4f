"""Is there a usable NVIDIA GPU and TensorRT-LLM? Probed without importing tensorrt/tensorrt_llm.

TensorRT runtimes segfault (not raise) without a GPU, and `import tensorrt_llm` fails without libcuda, so the probe
is: find_spec for the package, then NVML for a device. Only after both pass may callers import TensorRT-LLM.
"""
from __future__ import annotations

import importlib.util


def nvml_device_count() -> tuple[int, str | None]:
    """(number of NVML devices, reason when 0)."""
    try:
        import pynvml
    except ImportError:
        return 0, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return 0, f"NVML unavailable ({e}): no NVIDIA driver/GPU on this host"
    try:
        return pynvml.nvmlDeviceGetCount(), None
    except pynvml.NVMLError as e:
        return 0, f"NVML error ({e})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def gpu_unavailable_reason() -> str | None:
    """None when a GPU and tensorrt_llm are both present, else why not (used for skips and `build` guidance)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed (it comes from NVIDIA's package index on a GPU host)"
    count, why = nvml_device_count()
    if count == 0:
        return why or "no NVIDIA GPU found by NVML"
    return None
