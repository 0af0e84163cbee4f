"""Which TensorRT builder a target uses and which precisions that builder refuses: data (`ROUTES`,
`PRECISION_RULES`) keyed by target fields (family, SM), never GPU names. Kept apart from engine/build.py so the recipe
check (recipes.validate -> `check_recipe`) needs no builder code, and engine/build.py may read recipes freely.
Sources: docs/engines.md.
"""
from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass

from trt_gemma.errors import RecipeError
from trt_gemma.targets import Target, sm_str


ENGINE_DIR = "tensorrt"  # BUNDLE/tensorrt/: model.engine + manifest.json + profiles
ENGINE_FILE = "model.engine"


# --- builders and routes -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Builder:
    name: str  # the Python module
    distributions: tuple[str, ...]  # where its version is read (first installed wins)
    targets_sm: bool  # builds for a chosen compute capability on any host (else: for the GPU it runs on)
    timing_cache: bool  # False: the builder's timing-cache API is a no-op
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names set when the enum has them
    install: str  # how a user gets it


BUILDERS: dict[str, Builder] = {
    "tensorrt": Builder("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_bindings"),
                        targets_sm=False, timing_cache=True,
                        # TRT 8.x needs EXPLICIT_BATCH; strongly typed keeps the graph's fp16/INT4 types (TRT >= 9)
                        network_flags=("EXPLICIT_BATCH", "STRONGLY_TYPED"),
                        install="on a Jetson: JetPack's python3-libnvinfer (sudo apt install python3-libnvinfer); "
                                "on a data-center GPU host: pip install tensorrt"),
    "tensorrt_rtx": Builder("tensorrt_rtx", ("tensorrt_rtx", "tensorrt-rtx"), targets_sm=True, timing_cache=False,
                            network_flags=(), install="pip install 'trt-gemma[rtx]' (tensorrt-rtx and polygraphy)"),
}


# TensorRT DataType member name -> numpy dtype name: how the build record and the runtime's TensorSpec spell dtypes
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
              "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn", "INT4": "int4"}


def numpy_dtype(trt_dtype) -> str:
    """A TensorRT DataType (enum member or its name) as a numpy dtype name."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    return TRT_DTYPES.get(name, name.lower())


@dataclass(frozen=True)
class Route:
    families: frozenset[str]  # Target.family values; empty = any
    sm_min: int
    sm_max: int
    builder: str
    why: str


# First match wins. TensorRT-RTX compiles for consumer/workstation SMs only (its ComputeCapability enum: SM75, SM80,
# SM86, SM89, SM120, SM121 in 1.7); Jetson and data-center GPUs use TensorRT itself.
ROUTES: tuple[Route, ...] = (
    Route(frozenset({"jetson"}), 0, 10**6, "tensorrt",
          "JetPack ships TensorRT with its Python bindings; TensorRT-RTX does not target Tegra GPUs"),
    Route(frozenset({"rtx"}), 75, 129, "tensorrt_rtx",
          "TensorRT-RTX targets RTX GPUs by compute capability and builds on any host"),
    Route(frozenset(), 0, 10**6, "tensorrt", "TensorRT builds for the data-center GPU it runs on"),
)


def builder_version(builder: Builder) -> str | None:
    """The installed version of the builder's package (the first of its distributions found), None if absent."""
    for dist in builder.distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def route(t: Target) -> tuple[Builder, str]:
    """(builder, why) for a target."""
    for r in ROUTES:
        if (not r.families or t.family in r.families) and r.sm_min <= t.sm <= r.sm_max:
            return BUILDERS[r.builder], r.why
    raise AssertionError("ROUTES ends with a catch-all")


@dataclass(frozen=True)
class PrecisionRule:
    builders: frozenset[str]
    precisions: frozenset[str]  # recipe quant / dtype values
    sm_min: int
    sm_max: int
    min_version: tuple[int, ...]  # refused below this builder version (checked when the version is known)
    reason: str


_ALL_BUILDERS = frozenset(BUILDERS)
_INT4 = frozenset({"int4_awq", "int4_wo"})
# Ordered, first match wins; a precision no rule names is accepted. The tensorrt_rtx reasons are the builder's own
# messages (tensorrt-rtx 1.7.1, building a one-MatMul graph for each SM on a GPU-less host); docs/engines.md.
PRECISION_RULES: tuple[PrecisionRule, ...] = (
    PrecisionRule(_ALL_BUILDERS, frozenset({"fp8"}), 0, 88, (),
                  "FP8 (E4M3) needs SM >= 8.9; the builder says: \"Cannot compile for target(s) sm86, because the "
                  "model contains HW-specific datatypes: fp8_e4m3\""),
    PrecisionRule(_ALL_BUILDERS, _INT4, 0, 79, (),
                  "INT4 weights need SM >= 8.0; the builder says: \"Cannot compile for target(s) sm75, because the "
                  "model contains HW-specific datatypes: int4\""),
    PrecisionRule(_ALL_BUILDERS, frozenset({"bfloat16"}), 0, 79, (),
                  "bf16 needs SM >= 8.0; the builder says: \"Cannot compile for target(s) sm75, because the model "
                  "contains HW-specific datatypes: b16\""),
    PrecisionRule(frozenset({"tensorrt"}), _INT4, 0, 10**6, (10, 0),
                  "INT4 weight-only (block-quantized DequantizeLinear) arrived in TensorRT 10.0 (JetPack 6.1+)"),
)


def _version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version or "")[:3])


def refusal(builder: str, precision: str, sm: int, version: str | None = None) -> str | None:
    """The builder's reason for refusing `precision` on SM `sm` (and version, when known), else None."""
    have = _version_tuple(version)
    for rule in PRECISION_RULES:
        if builder in rule.builders and precision in rule.precisions and rule.sm_min <= sm <= rule.sm_max:
            if rule.min_version and (not have or have >= rule.min_version):
                continue  # version rule: only refuses a known, older version
            return rule.reason
    return None


# recipe lm_head_quant -> the precision a builder sees (the head is block-quantized int4 / per-channel int8 weights)
LM_HEAD_PRECISIONS = {"int8": "int8_wo", "int4": "int4_wo"}


def recipe_precisions(recipe) -> dict[str, str]:
    """{recipe field: precision} the engine holds: weights, activations and, when quantized, the lm_head."""
    out = {"quant": recipe.quant, "dtype": recipe.dtype}
    head = LM_HEAD_PRECISIONS.get(getattr(recipe, "lm_head_quant", "none"))
    if head:
        out["lm_head_quant"] = head
    return out


def check_recipe(recipe, t: Target, origin: dict | None = None) -> None:
    """Refuse a TensorRT-route recipe whose weights or activations the target's builder cannot compile."""
    builder, _ = route(t)
    for key, precision in recipe_precisions(recipe).items():
        reason = refusal(builder.name, precision, t.sm)
        if reason:
            where = (origin or {}).get(key, "recipe default")
            fix = "use --set quant=int4_awq" if key == "quant" and t.sm >= 80 else (
                "use --set quant=float16" if key == "quant" else "use --set lm_head_quant=int8" if key ==
                "lm_head_quant" else "use --set dtype=float16")
            raise RecipeError(f"{where}: {builder.name} cannot build {key} = {getattr(recipe, key)!r} for --target "
                              f"{t.name} "
                              f"(SM {sm_str(t.sm)}): {reason}", fix=fix)
