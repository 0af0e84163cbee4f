"""NVIDIA hardware targets as a data table, and precision support derived from compute capability by ordered rules.

Figures come from docs/facts/targets.md §1 (sources listed there) and docs/facts/jetson.md; a field whose value is not
confirmed by a primary source is named in `Target.unconfirmed`. Cards absent from the reference page (RTX 3060 12GB,
RTX 4060 8GB, RTX A6000, RTX 4000/6000 Ada, RTX PRO 6000 Blackwell) carry NVIDIA's published spec-sheet values as
general knowledge and are flagged unconfirmed field by field.

Precision support is never a list of GPU names (optimum-nvidia's `SM_FP8_SUPPORTED = {89, 90}` silently excludes newer
SMs, docs/facts/targets.md §3): `RULES` is an ordered table of SM ranges, first match wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trt_gemma.errors import InputError

GiB = 1024**3
MiB = 1024**2

FAMILIES = ("jetson", "rtx", "datacenter")


@dataclass(frozen=True)
class Target:
    name: str
    title: str
    sm: int  # compute capability as an integer: 87 = 8.7, 110 = 11.0
    memory_bytes: int  # physical DRAM / VRAM
    usable_bytes: int  # what the OS shows (Jetson: /proc/meminfo MemTotal); dGPU: same as memory_bytes
    bandwidth_gbs: float  # peak memory bandwidth, GB/s (1e9)
    family: str
    unified: bool = False  # CPU and GPU share the DRAM (Jetson)
    notes: str = ""
    aliases: tuple[str, ...] = ()  # words in an NVML device name that identify this card (detection only)
    unconfirmed: frozenset[str] = field(default_factory=frozenset)  # field names whose value is not confirmed
    trt_caveat: str = ""  # why TensorRT-LLM's Gemma 2 path is missing/unconfirmed here; "" = supported (planner notes)

    @property
    def sm_str(self) -> str:
        return sm_str(self.sm)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "title": self.title, "sm": self.sm_str, "sm_int": self.sm,
            "memory_bytes": self.memory_bytes, "usable_bytes": self.usable_bytes,
            "bandwidth_gbs": self.bandwidth_gbs, "family": self.family, "unified": self.unified,
            "notes": self.notes, "unconfirmed": sorted(self.unconfirmed), "trt_caveat": self.trt_caveat,
            "precisions": {p: supports(self, p)[0] for p in PRECISIONS},
        }


def sm_str(sm: int) -> str:
    return f"{sm // 10}.{sm % 10}"


# docs/facts/jetson.md §3, §6: v0.12.0-jetson (the only Jetson release) predates Gemma 2; 1.x built from source for SM
# 8.7 exists in jetson-containers but running Gemma 2 engines with it is unconfirmed.
_ORIN_TRT = ("TensorRT-LLM's only Jetson release (v0.12.0-jetson) predates Gemma 2; a 1.x build from source for "
             "SM 8.7 running Gemma 2 is unconfirmed: measure on the device")


def _j(name, title, sm, gib, memtotal_mib, bw, notes="", unconfirmed=(), trt_caveat=_ORIN_TRT):
    """A Jetson module: unified LPDDR5; MemTotal (MiB) is what the kernel reports after carve-outs."""
    return Target(name, title, sm, int(gib * GiB), int(memtotal_mib * MiB), bw, "jetson", True, notes,
                  (), frozenset(unconfirmed), trt_caveat)


def _d(name, title, sm, gib, bw, family, aliases, notes="", unconfirmed=()):
    return Target(name, title, sm, int(gib * GiB), int(gib * GiB), bw, family, False, notes, tuple(aliases),
                  frozenset(unconfirmed))


# Jetson MemTotal: 8GB Orin Nano 7620 MiB, AGX Orin 30536 / 62817 MiB (docs/facts/targets.md §1). Modules without a
# published figure use 0.93 x nominal (the ratio of the two known small/mid modules) and are flagged unconfirmed.
_EST = 0.93
_TARGETS = [
    _j("jetson-orin-nano-4gb", "Jetson Orin Nano 4GB", 87, 4, 4 * 1024 * _EST, 34.0,
       "512 CUDA cores / 16 TC, 64-bit LPDDR5; Super mode (JetPack 6.2) raises bandwidth to about 51 GB/s [UNCONF]",
       ("usable_bytes",)),
    _j("jetson-orin-nano-8gb", "Jetson Orin Nano 8GB", 87, 8, 7620, 68.0,
       "1024 CUDA cores / 32 TC, 128-bit LPDDR5; original (non-Super) power modes"),
    _j("jetson-orin-nano-super", "Jetson Orin Nano 8GB (Super mode)", 87, 8, 7620, 102.0,
       "same module as orin-nano-8gb in JetPack 6.1/6.2 'Super' mode (25 W / MAXN_SUPER): 68 -> 102 GB/s"),
    _j("jetson-orin-nx-8gb", "Jetson Orin NX 8GB", 87, 8, 8 * 1024 * _EST, 102.4, "1024 CUDA cores / 32 TC",
       ("usable_bytes",)),
    _j("jetson-orin-nx-16gb", "Jetson Orin NX 16GB", 87, 16, 16 * 1024 * _EST, 102.4, "1024 CUDA cores / 32 TC",
       ("usable_bytes",)),
    _j("jetson-agx-orin-32gb", "Jetson AGX Orin 32GB", 87, 32, 30536, 204.8, "1792 CUDA cores / 56 TC, 256-bit"),
    _j("jetson-agx-orin-64gb", "Jetson AGX Orin 64GB", 87, 64, 62817, 204.8, "2048 CUDA cores / 64 TC, 256-bit"),
    _j("jetson-thor", "Jetson AGX Thor (T5000)", 110, 128, 128 * 1024 * _EST, 273.0,
       "SM 11.0 (sm_101 with CUDA < 13); TensorRT-LLM has no Jetson Thor support and rejects INT4/INT8 on SM 100-119 "
       "(#5594): no supported Gemma 2 TRT path; hardware-capable recipe is FP8 + FP8 KV", ("usable_bytes",),
       "TensorRT-LLM has no Jetson Thor support: no supported Gemma 2 TRT path today (docs/facts/jetson.md §6)"),
    # RTX (consumer and workstation). Cards missing from docs/facts/targets.md use NVIDIA spec-sheet values [GK].
    _d("rtx-3060-12gb", "GeForce RTX 3060 12GB", 86, 12, 360.0, "rtx", ("RTX 3060",),
       "GA106, 192-bit GDDR6", ("memory_bytes", "bandwidth_gbs", "sm")),
    _d("rtx-3090", "GeForce RTX 3090", 86, 24, 936.2, "rtx", ("RTX 3090",), "GA102, GDDR6X"),
    _d("rtx-4060-8gb", "GeForce RTX 4060 8GB", 89, 8, 272.0, "rtx", ("RTX 4060",),
       "AD107, 128-bit GDDR6", ("memory_bytes", "bandwidth_gbs", "sm")),
    _d("rtx-4090", "GeForce RTX 4090", 89, 24, 1008.0, "rtx", ("RTX 4090",), "AD102, GDDR6X"),
    _d("rtx-5090", "GeForce RTX 5090", 120, 32, 1790.0, "rtx", ("RTX 5090",),
       "GB202; INT4-AWQ kernels and Gemma 2 NVFP4 on SM 12.0 unconfirmed", ("memory_bytes",)),
    _d("rtx-a6000", "RTX A6000", 86, 48, 768.0, "rtx", ("RTX A6000",),
       "GA102 workstation, GDDR6 ECC", ("memory_bytes", "bandwidth_gbs", "sm")),
    _d("rtx-4000-ada", "RTX 4000 Ada Generation", 89, 20, 360.0, "rtx", ("RTX 4000 Ada",),
       "AD104 workstation, GDDR6 ECC", ("memory_bytes", "bandwidth_gbs", "sm")),
    _d("rtx-6000-ada", "RTX 6000 Ada Generation", 89, 48, 960.0, "rtx", ("RTX 6000 Ada",),
       "AD102 workstation, GDDR6 ECC", ("memory_bytes", "bandwidth_gbs", "sm")),
    _d("rtx-pro-6000-blackwell", "RTX PRO 6000 Blackwell", 120, 96, 1792.0, "rtx", ("RTX PRO 6000",),
       "GB202 workstation, GDDR7 ECC; INT4-AWQ on SM 12.0 unconfirmed", ("memory_bytes", "bandwidth_gbs", "sm")),
    # Data center
    _d("t4", "Tesla T4", 75, 16, 320.0, "datacenter", ("T4",),
       "Turing: fp16 only (no bf16), absent from TensorRT-LLM's support matrix; AWQ kernels on SM 7.5 unconfirmed",
       ("sm",)),
    _d("a10", "A10", 86, 24, 600.0, "datacenter", ("A10",), "GA102, GDDR6"),
    _d("l4", "L4", 89, 24, 300.0, "datacenter", ("L4",), "AD104, GDDR6"),
    _d("a100-40gb", "A100 40GB", 80, 40, 1555.0, "datacenter", ("A100",),
       "HBM2e; bandwidth is the 40GB SXM spec-sheet figure", ("bandwidth_gbs",)),
    _d("a100-80gb", "A100 80GB", 80, 80, 2000.0, "datacenter", ("A100",), "HBM2e, ~2.0 TB/s (SXM)"),
    _d("h100", "H100 SXM 80GB", 90, 80, 3350.0, "datacenter", ("H100",), "HBM3 (PCIe variant: 2.0 TB/s)"),
    _d("h200", "H200", 90, 141, 4800.0, "datacenter", ("H200",), "HBM3e"),
    _d("b200", "B200", 100, 192, 8000.0, "datacenter", ("B200",),
       "HBM3e; TensorRT-LLM builder rejects INT4/INT8 on SM 100-119: FP8 + FP8 KV"),
]
TARGETS: dict[str, Target] = {t.name: t for t in _TARGETS}


def get_target(name: str | Target) -> Target:
    """The target named `name`: the one lookup by name, made at a command's boundary (commands/, stages, api,
    detect.resolve_target); everything below takes the Target (tests/test_import_graph.py checks who calls this)."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name), TARGETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"unknown target {name!r}{hint}",
                         fix="run `trt-gemma targets` for the list of targets") from None


# --- precision support -------------------------------------------------------------------------------------------

# Weight formats (trt_gemma.quant.formats names), KV-cache dtypes (prefixed "kv_") and NVFP4.
PRECISIONS = ("bfloat16", "float16", "int8_wo", "int4_wo", "int4_awq", "fp8", "kv_fp8", "kv_int8", "nvfp4")
_INT_WEIGHTS = frozenset({"int8_wo", "int4_wo", "int4_awq"})


@dataclass(frozen=True)
class Rule:
    precisions: frozenset[str]
    sm_min: int  # inclusive
    sm_max: int  # inclusive
    level: str  # "yes" | "no" | "unconfirmed"
    reason: str


def _r(precisions, sm_min, sm_max, level, reason):
    return Rule(frozenset(precisions), sm_min, sm_max, level, reason)


_ALL = frozenset(PRECISIONS)
# Ordered: the first rule whose SM range and precision match decides. Sources: TRT builder.py, support-matrix.md,
# features/quantization.md; ELLM support-matrix (docs/facts/targets.md §1 "Precision support
# by SM", docs/tensorrt-llm-contract.md §5).
RULES: tuple[Rule, ...] = (
    _r(_ALL, 0, 74, "no", "TensorRT-LLM needs SM >= 7.5"),
    _r({"bfloat16"}, 0, 79, "no", "bf16 needs SM >= 8.0 (Turing SM 7.5 has fp16 only)"),
    _r({"fp8", "kv_fp8"}, 0, 88, "no", "FP8 needs SM >= 8.9"),
    _r({"nvfp4"}, 0, 99, "no", "NVFP4 needs SM >= 10.0"),
    _r(_INT_WEIGHTS, 100, 119, "no",
       "TensorRT-LLM's builder rejects INT8/INT4 weights on SM 10.0-11.9 (builder.py RuntimeError, #5594)"),
    _r({"kv_int8"}, 100, 119, "unconfirmed", "INT8 KV on SM 10.0-11.9 is not confirmed"),
    _r(_INT_WEIGHTS | {"kv_int8"}, 75, 79, "unconfirmed",
       "SM 7.5 is absent from TensorRT-LLM's support matrix; weight-only/AWQ kernels there are unconfirmed"),
    _r(_INT_WEIGHTS, 120, 129, "unconfirmed", "INT4/INT8 weight-only on SM 12.x is unconfirmed"),
    _r(_ALL, 0, 10**6, "yes", "supported"),
)


def support_level(target_or_sm: Target | int, precision: str) -> tuple[str, str]:
    """("yes"|"no"|"unconfirmed", reason) for `precision` on a target or an SM integer (a detected GPU's)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}", fix=f"one of: {', '.join(PRECISIONS)}")
    sm = target_or_sm.sm if isinstance(target_or_sm, Target) else int(target_or_sm)
    for rule in RULES:
        if precision in rule.precisions and rule.sm_min <= sm <= rule.sm_max:
            return rule.level, f"SM {sm_str(sm)}: {rule.reason}"
    raise AssertionError("RULES ends with a catch-all")


def supports(target_or_sm: Target | int, precision: str) -> tuple[bool, str]:
    """(usable?, reason). Unconfirmed combinations count as usable; the reason says they are unconfirmed."""
    level, reason = support_level(target_or_sm, precision)
    return level != "no", reason

