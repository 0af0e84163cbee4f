"""Jetson (integrated GPU, unified memory) telemetry from procfs/sysfs, without NVML (it reports almost nothing there).

Sources, per docs/facts/serving-telemetry.md §4 (jetson_stats jtop/core/{memory,gpu,power}.py):
- /proc/meminfo: MemTotal, MemAvailable (NOT MemFree: on unified memory MemFree counts page cache as used, which is the
  `cudaMemGetInfo` pitfall on Orin/Thor/GB10), NvMapMemUsed (memory shared CPU<->GPU through nvmap; absent on Thor).
- GPU devfreq: /sys/class/devfreq/* whose device/of_node/name is a Jetson GPU; load = <device>/load / 10 (%),
  cur/min/max_freq in Hz, governor.
- INA3221 rails: /sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_label, in<N>_input (mV), curr<N>_input (mA);
  power mW = mV * mA / 1000. "NC" (not connected) labels and "sum of shunt voltages" are skipped as jtop does.
- thermal zones: /sys/class/thermal/thermal_zone*/{type,temp} in milli-degC; -256 C means "sensor absent".
Every path is under `root` so tests run on fixture trees.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trt_gemma.telemetry.fields import UNAVAILABLE, read_int, read_text

GPU_NODE_NAMES = {"gv11b", "gp10b", "ga10b", "gb10b", "gpu"}
MEMINFO_FIELDS = {  # /proc/meminfo key -> our field (bytes)
    "MemTotal": "mem_total", "MemFree": "mem_free", "MemAvailable": "mem_available", "Buffers": "buffers",
    "Cached": "cached", "SReclaimable": "sreclaimable", "SwapTotal": "swap_total", "SwapFree": "swap_free",
    "NvMapMemUsed": "nvmap_used",
}
ABSENT_SENSOR_MILLI_C = -256000
_MEMINFO_RE = re.compile(r"^(\w+(?:\(\w+\))?):\s+(\d+)(?:\s+(kB))?")


def is_jetson(root: Path = Path("/")) -> bool:
    """L4T writes /etc/nv_tegra_release; the device tree names the SoC "nvidia,tegra..." on every Jetson."""
    if (root / "etc/nv_tegra_release").is_file():
        return True
    compatible = read_text(root / "proc/device-tree/compatible") or ""
    return "nvidia,tegra" in compatible


def read_meminfo(root: Path = Path("/")) -> dict[str, Any]:
    """Selected /proc/meminfo fields in bytes (UNAVAILABLE when the kernel lacks one, e.g. NvMapMemUsed on Thor)."""
    raw: dict[str, int] = {}
    text = read_text(root / "proc/meminfo") or ""
    for line in text.splitlines():
        m = _MEMINFO_RE.match(line.strip())
        if m:
            raw[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    out = {ours: raw.get(key, UNAVAILABLE) for key, ours in MEMINFO_FIELDS.items()}
    if isinstance(out["mem_total"], int) and isinstance(out["mem_available"], int):
        out["used"] = out["mem_total"] - out["mem_available"]
    else:
        out["used"] = UNAVAILABLE
    return out


def read_gpu_devfreq(root: Path = Path("/")) -> list[dict[str, Any]]:
    """One entry per GPU devfreq node (Thor has several: gpu-gpc-0, gpu-nvd-0)."""
    gpus = []
    for node in sorted((root / "sys/class/devfreq").glob("*")):
        of_name = read_text(node / "device/of_node/name")
        if of_name not in GPU_NODE_NAMES and node.name.split(".")[-1] not in GPU_NODE_NAMES:
            continue
        load = read_int(node / "device/load")
        gpus.append({
            "name": node.name,
            "load_percent": UNAVAILABLE if load is None else load / 10.0,
            **{f"{k}_hz": _or_unavailable(read_int(node / k)) for k in ("cur_freq", "min_freq", "max_freq")},
            "governor": _or_unavailable(read_text(node / "governor")),
        })
    return gpus


def read_power_rails(root: Path = Path("/")) -> dict[str, dict[str, Any]]:
    """INA3221 rails by label: voltage_mv, current_ma, power_mw."""
    rails: dict[str, dict[str, Any]] = {}
    for hwmon in sorted((root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
        for label_file in sorted(hwmon.glob("in*_label")):
            label = read_text(label_file) or ""
            channel = label_file.name[2:-len("_label")]
            if not label or label == "NC" or "sum of shunt" in label.lower():
                continue
            mv, ma = read_int(hwmon / f"in{channel}_input"), read_int(hwmon / f"curr{channel}_input")
            power = UNAVAILABLE if mv is None or ma is None else round(mv * ma / 1000)
            rails[label] = {"voltage_mv": _or_unavailable(mv), "current_ma": _or_unavailable(ma), "power_mw": power}
    return rails


def read_thermal(root: Path = Path("/")) -> dict[str, float]:
    """Zone type -> degrees C; absent sensors (-256 C) are left out."""
    temps: dict[str, float] = {}
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        kind, milli = read_text(zone / "type"), read_int(zone / "temp")
        if kind and milli is not None and milli != ABSENT_SENSOR_MILLI_C:
            temps[kind] = milli / 1000.0
    return temps


def read_jetson(root: Path = Path("/")) -> dict[str, Any]:
    return {
        "meminfo": read_meminfo(root),
        "gpu": read_gpu_devfreq(root),
        "rails": read_power_rails(root),
        "thermal_c": read_thermal(root),
        "l4t_release": _or_unavailable(_l4t_release(root)),
    }


def _l4t_release(root: Path) -> str | None:
    """'# R36 (release), REVISION: 4.3, ...' -> 'R36.4.3'."""
    text = read_text(root / "etc/nv_tegra_release")
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def _or_unavailable(value):
    return UNAVAILABLE if value is None else value
