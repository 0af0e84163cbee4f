"""Which NVIDIA device is this host? NVML for discrete GPUs, the device tree for Jetson. Never raises.

Evidence (docs/facts/targets.md §3, docs/facts/jetson.md §1):
- NVML `nvmlDeviceGetName`, `nvmlDeviceGetCudaComputeCapability`, `nvmlDeviceGetMemoryInfo` (nvidia-ml-py). On a host
  without the driver, `nvmlInit` raises NVMLError_LibraryNotFound: that is a normal "no GPU" answer, not a failure.
- Jetson: `<root>/proc/device-tree/model` (human string), `<root>/proc/device-tree/compatible` (NUL-separated; the SoC
  is the text after the last comma of the last entry: tegra234 = Orin, tegra264 = Thor), `<root>/etc/nv_tegra_release`
  line 1 (`# R36 (release), REVISION: 4.3, ...` -> L4T 36.4.3), `<root>/proc/meminfo` MemTotal.
NVML is unusable on Orin and partial on Thor, so the device tree wins when both exist.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from trt_gemma.targets import TARGETS, Target, get_target, sm_str

# SoC compatible string -> SM (jtop CUDA_TABLE, docs/facts/targets.md §1 sources)
SOC_SM = {"tegra264": 110, "tegra234": 87, "tegra194": 72}

# Jetson module part numbers from the device tree (docs/facts/targets.md §2; jtop jetson_variables.py). Order matters:
# the first entry whose pattern is found in `compatible` decides; "-super" is the JetPack 6.2 Super devkit flavour.
JETSON_PARTS: tuple[tuple[str, str], ...] = (
    ("p3767-0005-super", "jetson-orin-nano-super"),
    ("p3767-0005", "jetson-orin-nano-8gb"),  # Orin Nano devkit module (8GB)
    ("p3767-0004", "jetson-orin-nano-4gb"),
    ("p3767-0003", "jetson-orin-nano-8gb"),
    ("p3767-0001", "jetson-orin-nx-8gb"),
    ("p3767-0000", "jetson-orin-nx-16gb"),
    ("p3701-0004", "jetson-agx-orin-32gb"),
    ("p3701-0005", "jetson-agx-orin-64gb"),
    ("p3834", "jetson-thor"),
)

# L4T -> JetPack, keyed on the L4T string (docs/facts/jetson.md §1; JC l4t_version.py
# NVIDIA_JETPACK, jtop where they differ).
L4T_JETPACK = {
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4",
    "35.6.1": "5.1.5", "35.6.2": "5.1.5", "35.6.3": "5.1.5", "35.6.4": "5.1.6", "36.2.0": "6.0 DP", "36.3.0": "6.0",
    "36.4.0": "6.1", "36.4.2": "6.1.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1",
    "36.5.0": "6.2.1 (jetson-containers) / 6.2.2 (jtop)", "38.1.0": "7.0 EA", "38.2.0": "7.0", "38.2.1": "7.0",
    "38.2.2": "7.0", "38.4.0": "7.1", "39.0.0": "7.2 EA", "39.1.0": "7.2 GA (jetson-containers)",
    "39.2.0": "7.2 GA (jtop)",
}
_L4T_RE = re.compile(r"^# R(\d+) \(release\), REVISION: (\d+)\.(\d+)")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    sm: int
    memory_bytes: int


class NvmlUnavailable(Exception):
    """NVML cannot answer (library missing, driver not loaded, ...); the message says why."""


NvmlProbe = Callable[[], "list[GpuInfo]"]


@dataclass
class Detection:
    kind: str  # "dgpu" | "jetson" | "none"
    name: str | None = None
    sm: int | None = None
    memory_bytes: int | None = None
    l4t: str | None = None
    jetpack: str | None = None
    target: str | None = None
    approximate: bool = False
    why: str = ""  # how the target was chosen, or why nothing was found
    gpu_count: int = 0
    evidence: dict = field(default_factory=dict)

    @property
    def message(self) -> str:
        if self.kind == "none":
            return f"no NVIDIA GPU: {self.why}"
        sm = f"SM {sm_str(self.sm)}" if self.sm is not None else "SM unknown"  # a Tegra SoC missing from SOC_SM
        if self.target is None:
            return f"{self.name} ({sm}): no matching target: {self.why}"
        approx = " (approximate match)" if self.approximate else ""
        return f"{self.name} ({sm}) -> target {self.target}{approx}: {self.why}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sm"] = sm_str(self.sm) if self.sm is not None else None
        d["message"] = self.message
        return d


def nvml_gpus() -> list[GpuInfo]:
    """The real NVML probe through nvidia-ml-py. Raises NvmlUnavailable with the reason."""
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({e})") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise NvmlUnavailable(f"NVML unavailable: {type(e).__name__}: {e}") from None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            try:
                mem = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            except pynvml.NVMLError:  # Orin's nvgpu has no memory info: unified memory, see /proc/meminfo
                mem = 0
            gpus.append(GpuInfo(name, major * 10 + minor, mem))
        return gpus
    except pynvml.NVMLError as e:
        raise NvmlUnavailable(f"NVML error: {type(e).__name__}: {e}") from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def detect(root: Path = Path("/"), nvml: NvmlProbe = nvml_gpus) -> Detection:
    """Detect the host's device; `root` and `nvml` are injectable for tests. Never raises."""
    root = Path(root)
    evidence: dict = {}
    gpus, nvml_why = _probe(nvml, evidence)
    jetson = read_jetson(root, evidence)
    if jetson is not None:
        return _jetson_detection(jetson, evidence, len(gpus))
    if gpus:
        return _dgpu_detection(gpus, evidence)
    return Detection("none", why=f"{nvml_why}; no Jetson device tree at {root / 'proc/device-tree'}",
                     evidence=evidence)


def _probe(nvml: NvmlProbe, evidence: dict) -> tuple[list[GpuInfo], str]:
    try:
        gpus = list(nvml())
    except NvmlUnavailable as e:
        evidence["nvml"] = str(e)
        return [], str(e)
    except Exception as e:  # a broken binding must not turn detection into a crash
        evidence["nvml"] = f"NVML probe failed: {type(e).__name__}: {e}"
        return [], evidence["nvml"]
    evidence["nvml"] = [asdict(g) for g in gpus]
    return gpus, "" if gpus else "NVML found no devices"


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def read_jetson(root: Path, evidence: dict) -> dict | None:
    """Device-tree facts, or None when this is not a Jetson (no nvidia,tegra compatible entry)."""
    compat_raw = _read(root / "proc/device-tree/compatible")
    if compat_raw is None:
        return None
    compatible = [c for c in compat_raw.split("\0") if c.strip()]
    evidence["compatible"] = compatible
    socs = [c.rsplit(",", 1)[-1] for c in compatible if c.startswith("nvidia,tegra")]
    if not socs:
        return None
    model = (_read(root / "proc/device-tree/model") or "").rstrip("\0\n ")
    evidence["model"] = model
    release = _read(root / "etc/nv_tegra_release")
    l4t = parse_l4t(release) if release else None
    if release:
        evidence["nv_tegra_release"] = release.splitlines()[0] if release.splitlines() else ""
    memtotal = read_memtotal(root)
    evidence["memtotal_bytes"] = memtotal
    return {"soc": socs[-1], "compatible": compatible, "model": model, "l4t": l4t, "memtotal": memtotal}


def parse_l4t(text: str) -> str | None:
    """`# R36 (release), REVISION: 4.3, ...` -> "36.4.3" (jetson-containers' strict format)."""
    m = _L4T_RE.match(text.strip().splitlines()[0] if text.strip() else "")
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def read_memtotal(root: Path) -> int | None:
    text = _read(root / "proc/meminfo") or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _jetson_detection(j: dict, evidence: dict, gpu_count: int) -> Detection:
    sm = SOC_SM.get(j["soc"])
    jetpack = L4T_JETPACK.get(j["l4t"]) if j["l4t"] else None
    base = dict(kind="jetson", name=j["model"] or j["soc"], sm=sm, memory_bytes=j["memtotal"], l4t=j["l4t"],
                jetpack=jetpack, gpu_count=max(gpu_count, 1), evidence=evidence)
    joined = " ".join(j["compatible"])
    is_super = "super" in joined.lower() or "super" in j["model"].lower()
    for part, target in JETSON_PARTS:
        if part in joined:
            if is_super and target == "jetson-orin-nano-8gb":
                target = "jetson-orin-nano-super"
            return Detection(**base, target=target, why=f"module part number {part} in the device tree")
    if sm is None:
        return Detection(**base, target=None, approximate=True,
                         why=f"SoC {j['soc']} is not a target trt_gemma supports (Orin tegra234, Thor tegra264)")
    t, why = closest_target(sm, j["memtotal"] or 0, family="jetson")
    return Detection(**base, target=t.name if t else None, approximate=True,
                     why=f"unknown module ({joined}); {why}")


def _dgpu_detection(gpus: list[GpuInfo], evidence: dict) -> Detection:
    g = gpus[0]  # plans are per GPU; the others are reported in evidence
    t, why, exact = match_dgpu(g)
    extra = f"; {len(gpus)} GPUs, planning for GPU 0" if len(gpus) > 1 else ""
    return Detection("dgpu", name=g.name, sm=g.sm, memory_bytes=g.memory_bytes, target=t.name if t else None,
                     approximate=not exact, why=why + extra, gpu_count=len(gpus), evidence=evidence)


def match_dgpu(g: GpuInfo) -> tuple[Target | None, str, bool]:
    """(target, why, exact). Exact = a name alias matches, the SM is equal and memory is within 15%."""
    same_sm = [t for t in TARGETS.values() if t.family != "jetson" and t.sm == g.sm]
    named = [t for t in same_sm if any(re.search(rf"\b{re.escape(a)}\b", g.name, re.I) for a in t.aliases)]
    if named:
        t = min(named, key=lambda t: abs(t.memory_bytes - g.memory_bytes))
        if abs(t.memory_bytes - g.memory_bytes) <= 0.15 * t.memory_bytes:
            return t, f"name {g.name!r}, SM {sm_str(g.sm)} and memory match {t.name}", True
    t, why = closest_target(g.sm, g.memory_bytes, family=None)
    return t, f"{g.name!r} is not in the target table; {why}", False


def closest_target(sm: int, memory_bytes: int, family: str | None) -> tuple[Target | None, str]:
    """Same SM if any (closest memory), else the highest SM below it (capabilities only grow with SM)."""
    pool = [t for t in TARGETS.values() if (t.family == "jetson") == (family == "jetson")]
    same = [t for t in pool if t.sm == sm]
    if same:
        t = min(same, key=lambda t: abs(t.usable_bytes - memory_bytes))
        return t, f"closest by memory among SM {sm_str(sm)} targets"
    lower = [t for t in pool if t.sm < sm]
    if not lower:
        return None, f"no target at or below SM {sm_str(sm)}"
    best_sm = max(t.sm for t in lower)
    t = min((t for t in lower if t.sm == best_sm), key=lambda t: abs(t.usable_bytes - memory_bytes))
    return t, f"no SM {sm_str(sm)} target; closest lower SM {sm_str(best_sm)} by memory"


DEFAULT_TARGET = "jetson-orin-nano-8gb"  # what `--target auto` plans/builds for on a host without an NVIDIA GPU


def resolve_target(target: "str | Target | None", detection: "Detection | None" = None) -> tuple[Target, str]:
    """(target, how it was chosen), resolved once: callers pass the Target object down. "auto" uses detection; a
    GPU-less host gets DEFAULT_TARGET, said plainly. `how` never repeats the target name (callers print it)."""
    if isinstance(target, Target):
        return target, "named with --target"
    if target not in (None, "", "auto"):
        return get_target(target), "named with --target"
    d = detection if detection is not None else detect()
    if d.target:
        approx = " (approximate match)" if d.approximate else ""
        return TARGETS[d.target], f"detected: {d.message}{approx}"
    return TARGETS[DEFAULT_TARGET], f"default: {d.message}; pass --target to choose"
