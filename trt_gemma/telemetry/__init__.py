"""Memory, power and KV-cache telemetry: NVML (dGPU), Jetson procfs/sysfs/tegrastats, this process, the model.
May import: base modules (errors, gpu_probe) only.
"""
from trt_gemma.telemetry.fields import UNAVAILABLE
from trt_gemma.telemetry.snapshot import MEMORY_KINDS, snapshot

__all__ = ["UNAVAILABLE", "MEMORY_KINDS", "snapshot"]
