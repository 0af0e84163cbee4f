"""TensorRT engines from our standard-operator ONNX graph: `tensorrt` (Jetson, data center) or `tensorrt_rtx` (RTX).

Which builder a target uses, and which precisions that builder accepts, are data (engine/rules.py), keyed
by target fields (family, SM) and never by GPU names. A precision a builder refuses is refused by the recipe check
(`check_recipe`, called from recipes.validate for `engine = "tensorrt"` recipes) with the builder's own words, before
any export or build runs.

Builders (docs/engines.md has the sources):
- `tensorrt_rtx` (PyPI `tensorrt-rtx`) targets a compute capability chosen in the builder config
  (`num_compute_capabilities = 1; set_compute_capability(SM89, 0)`), so it builds an RTX engine on any host, even one
  without a GPU (it logs a CUDA error 35 first and carries on). Its timing-cache calls are no-ops since 1.2.
- `tensorrt` (JetPack's python3-libnvinfer on a Jetson, the `tensorrt` wheel on a data-center host) builds for the GPU
  it runs on: it needs that GPU, and a timing cache kept in the bundle makes rebuilds faster.

Optimization profiles come from the graph itself: every dynamic input dimension is classified as batch, new tokens,
past tokens or total tokens (its symbolic name first, else the input's name and axis), then sized from the recipe:
profile 0 "prefill" (new 1..max_input_len on an empty or short cache), profile 1 "decode" (one new token on a cache of
1..max_seq_len-1). One graph, two profiles: the same weights serve both phases.

Engines run only on a GPU (`run_engine`, polygraphy's TrtRunner, import-guarded); `polygraphy_commands` prints the
exact commands that compare an engine against onnxruntime: the onnxruntime half runs on any host (on a float32 export
when the engine's graph is bfloat16, which onnxruntime's CPU EP cannot run), the engine half on the device.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trt_gemma.errors import DependencyError, InputError, RecipeError
from trt_gemma.fsutil import atomic_output_dir, atomic_write
from trt_gemma.safe_io import read_json_object
from trt_gemma.engine.rules import (BUILDERS, ENGINE_DIR, ENGINE_FILE, Builder, builder_version,  # noqa: F401
                                    check_recipe, numpy_dtype, recipe_precisions, refusal, route)
from trt_gemma.targets import Target, sm_str

TIMING_CACHE = "tensorrt.timing.cache"  # at the bundle root, so a --force rebuild of the engine keeps it
ONNX_DIR = "onnx"
# onnxruntime's CPU EP has no bfloat16 kernels (`NOT_IMPLEMENTED ... Mul(14)`): a bf16 engine is compared against a
# float32 export of the same checkpoint, kept here; float32 / float16 graphs are compared against themselves.
CHECK_ONNX_DIR = "onnx-check"
ORT_CPU_DTYPES = ("FLOAT", "FLOAT16")
# polygraphy --atol/--rtol by the engine graph's float dtype: about ten units in the last place of that dtype (eps
# 2^-23, 2^-10, 2^-7). Measured on the embedded model, a float16 graph's logits stay within 0.003 of float32's
# (docs/engines.md); bfloat16's eps is 8x float16's.
CHECK_TOLERANCE = {"FLOAT": 1e-3, "FLOAT16": 1e-2, "BFLOAT16": 8e-2}
DTYPE_NAMES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16"}  # ONNX element type -> ours
TENSORRT_KV_CACHE = "pool"  # the graph contract engines are built from (trt_gemma/onnx/pool.py)


def available_builders() -> dict[str, dict]:
    """{name: {"installed", "version", "targets_sm"}} without importing anything (doctor)."""
    out = {}
    for name, b in BUILDERS.items():
        found = importlib.util.find_spec(b.name) is not None
        out[name] = {"installed": found, "version": builder_version(b) if found else None,
                     "targets_sm": b.targets_sm, "install": b.install}
    return out


def require_route_here(target: Target) -> None:
    """An engine asked for by name (`build --engine tensorrt`) must be built where it can be: raise before the bundle
    is made when this host lacks what it could have. The ONNX export always runs here; a builder that targets any SM
    (TensorRT-RTX) builds here too. Only a builder that needs the device's GPU (TensorRT) is left for the device."""
    b, _ = route(target)
    if importlib.util.find_spec("onnx") is None:
        raise DependencyError(f"--engine tensorrt exports the bundle to ONNX on this host for {target.name}, and the "
                              "onnx package is not installed", fix="pip install 'trt-gemma[onnx]'")
    if b.targets_sm and importlib.util.find_spec(b.name) is None:
        raise DependencyError(f"--engine tensorrt builds the {target.name} engine on this host with {b.name} (it "
                              f"targets SM {sm_str(target.sm)} without that GPU), and {b.name} is not installed",
                              fix=b.install)


def _unavailable_reason(builder: Builder) -> str | None:
    """Why this host cannot run `builder` now (None: it can). TensorRT proper is imported only where a GPU is found:
    NVML on a dGPU, the device tree on a Jetson (NVML does not see Orin's GPU)."""
    if importlib.util.find_spec(builder.name) is None:
        return f"{builder.name} is not installed ({builder.install})"
    if builder.targets_sm:
        return None
    from trt_gemma.detect import detect

    if detect().kind == "none":
        return f"{builder.name} builds for the GPU it runs on, and this host has none"
    return None


# --- building ----------------------------------------------------------------------------------------------------

@dataclass
class EngineBuild:
    engine_path: Path
    builder: str
    builder_version: str
    sm: str
    profiles: dict
    engine_bytes: int
    build_seconds: float
    timing_cache: str | None
    onnx: str
    check_commands: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    precisions: list = field(default_factory=list)  # the recipe's, as checked against the builder
    activation_dtype: str | None = None  # what the graph computes in (its float inputs: the KV cache)
    io: dict = field(default_factory=dict)  # io_record: what the builder saw; the runtime checks the engine against it

    def to_dict(self) -> dict:
        return {"engine_path": str(self.engine_path), "builder": self.builder, "builder_version": self.builder_version,
                "sm": self.sm, "profiles": {k: {n: [list(s) for s in v] for n, v in p.items()}
                                            for k, p in self.profiles.items()},
                "engine_bytes": self.engine_bytes, "build_seconds": self.build_seconds,
                "timing_cache": self.timing_cache, "onnx": self.onnx, "check_commands": self.check_commands,
                "warnings": self.warnings, "precisions": self.precisions, "activation_dtype": self.activation_dtype,
                "io": self.io}


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def build_engine(onnx_path: str | Path, out_dir: str | Path, t: Target, limits, *,
                 precisions: tuple[str, ...] = (), force: bool = False, timing_cache: str | Path | None = None,
                 log: Callable[[str], None] | None = None, check_onnx: str | Path | None = None) -> EngineBuild:
    """Compile `onnx_path` into OUT_DIR/model.engine for `target` with its route's builder (atomic: on any error
    nothing is left). `precisions` (the recipe's quant/dtype) are re-checked against the installed builder version;
    `timing_cache` is read if present and written back (builders whose cache is a no-op skip it). `check_onnx`: the
    graph onnxruntime runs in the printed comparison (default `onnx_path`; a float32 export for a bfloat16 graph)."""
    from trt_gemma.engine.profiles import Limits, graph_inputs, profiles

    b, _ = route(t)
    why = _unavailable_reason(b)
    if why:
        raise DependencyError(f"cannot build a {b.name} engine for {t.name} here: {why}",
                              fix=b.install if b.targets_sm else f"build it on the device, with its GPU ({b.install})")
    version = builder_version(b) or "unknown"
    for p in precisions:
        reason = refusal(b.name, p, t.sm, version)
        if reason:
            raise RecipeError(f"{b.name} {version} cannot build {p!r} for {t.name} (SM {sm_str(t.sm)}): {reason}",
                              fix="change the recipe's quant/dtype, or upgrade the builder (JetPack 6.1+ on Orin)")
    lim = limits if isinstance(limits, Limits) else Limits.from_recipe(limits)
    inputs = graph_inputs(onnx_path)
    profs = profiles(inputs, lim)
    sm, warnings = _build_sm(b, t)
    cache_path = Path(timing_cache) if (timing_cache and b.timing_cache) else None
    cache_in = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    _say(log, f"building a {b.name} {version} engine for SM {sm_str(sm)} from {onnx_path} "
              f"({len(profs)} profiles: {', '.join(profs)})")
    t0 = time.time()
    out = Path(out_dir)
    with atomic_output_dir(out, force) as tmp:
        blob, cache_out, io = _compile(b, Path(onnx_path), sm, profs, cache_in)
        (tmp / ENGINE_FILE).write_bytes(blob)
        seconds = round(time.time() - t0, 2)
        result = EngineBuild(out / ENGINE_FILE, b.name, version, sm_str(sm), profs, len(blob), seconds,
                             str(cache_path) if cache_path else None, str(onnx_path),
                             _check_commands(onnx_path, check_onnx, out, inputs, lim, b.name, warnings), warnings,
                             list(precisions), DTYPE_NAMES[graph_float_dtype(inputs)], io)
        (tmp / "manifest.json").write_text(json.dumps({"kind": "tensorrt-engine", "target": t.name,
                                                        **result.to_dict()}, indent=2) + "\n")
    if cache_path is not None and cache_out:
        atomic_write(cache_path, cache_out)  # a new temp file renamed over it: never through a link in the bundle
    _say(log, f"engine: {result.engine_path} ({len(blob):,} bytes, {seconds:.1f} s)")
    return result


def graph_float_dtype(inputs) -> str:
    """The float element type of the graph's inputs (its KV cache: the activations), FLOAT when it has none."""
    return next((gi.dtype for gi in inputs if gi.dtype in CHECK_TOLERANCE), "FLOAT")


def _check_commands(onnx_path, check_onnx, out: Path, inputs, lim, builder: str, warnings: list) -> list[str]:
    """The polygraphy pair (onnxruntime side, then the engine) at the tolerance of the engine's dtype. Without a
    graph onnxruntime's CPU EP runs, the first command needs an onnxruntime with bfloat16 kernels: said as a
    warning, since the printed commands must run where they say they run."""
    from trt_gemma.engine.profiles import polygraphy_commands

    dtype = graph_float_dtype(inputs)
    check = Path(check_onnx) if check_onnx is not None else Path(onnx_path)
    if check_onnx is None and dtype not in ORT_CPU_DTYPES:
        warnings.append(f"{onnx_path} computes in {dtype.lower()}, which onnxruntime's CPU EP cannot run: export the "
                        f"checkpoint with --activations float32 and run the first check command on that graph")
    tol = CHECK_TOLERANCE[dtype]
    return polygraphy_commands(check, out / ENGINE_FILE, inputs, lim, builder, out, atol=tol, rtol=tol)


def _build_sm(b: Builder, t: Target) -> tuple[int, list[str]]:
    """The SM the engine is built for: the target's (compute-capability targeting) or this host's GPU."""
    if b.targets_sm:
        return t.sm, []
    from trt_gemma.detect import detect

    host = detect()
    if host.sm is None or host.sm == t.sm:
        return (host.sm or t.sm), []
    return host.sm, [f"engine built on {host.name} (SM {sm_str(host.sm)}) for target {t.name} "
                     f"(SM {sm_str(t.sm)}): it runs on SM {sm_str(host.sm)} only"]


def collecting_logger(trt):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            # TensorRT-RTX on a GPU-less host logs CUDA error 35 and carries on: not a build failure
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR) and "cudaError 35" not in msg:
                self.errors.append(msg)
    return _Logger()


def io_record(network, profiles: dict) -> dict:
    """Each I/O tensor's name, dtype and shape (-1: dynamic) as the parsed network has them, and each profile's
    [min, opt, max] per dynamic input as read back from the builder's profile objects. A serialized engine cannot be
    opened without a GPU (deserialization needs CUDA), so this record, written where the engine is built, is what the
    runtime checks the engine against at load (runtime/engine_plan.io_mismatches) and what `inspect` shows."""
    tensors = []
    for getter, count, is_input in ((network.get_input, network.num_inputs, True),
                                    (network.get_output, network.num_outputs, False)):
        for i in range(count):
            t = getter(i)
            tensors.append({"name": t.name, "dtype": numpy_dtype(t.dtype), "shape": [int(d) for d in t.shape],
                            "is_input": is_input})
    return {"tensors": tensors,
            "profiles": {name: {n: [[int(d) for d in s] for s in profile.get_shape(n)] for n in names}
                         for name, (profile, names) in profiles.items()}}


def _compile(b: Builder, onnx_path: Path, sm: int, profs: dict, cache_in: bytes) -> tuple[bytes, bytes, dict]:
    trt = importlib.import_module(b.name)
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    for name in b.network_flags:
        if hasattr(trt.NetworkDefinitionCreationFlag, name):
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise InputError(f"{b.name} cannot parse {onnx_path}: {_first(errs)}",
                         fix="the graph must use standard ONNX operators only; re-export with `trt-gemma export-onnx`")
    config = builder.create_builder_config()
    if "STRONGLY_TYPED" in b.network_flags and not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 8.x: no strong typing, so allow the graph's fp16 kernels
    if b.targets_sm:
        cc = getattr(trt.ComputeCapability, f"SM{sm}", None)
        if cc is None:
            known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
            raise InputError(f"{b.name} cannot target SM {sm_str(sm)} (it knows {', '.join(known)})",
                             fix="pick a target whose SM the builder lists, or upgrade the builder")
        config.num_compute_capabilities = 1
        config.set_compute_capability(cc, 0)
    cache = None
    if b.timing_cache:
        cache = config.create_timing_cache(cache_in)
        config.set_timing_cache(cache, False)
    made = {}
    for prof_name, shapes in profs.items():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        made[prof_name] = (profile, list(shapes))
    io = io_record(network, made)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise InputError(f"{b.name} failed to build an engine for SM {sm_str(sm)} from {onnx_path}: "
                         f"{_first(logger.errors)}", fix="check the recipe's precisions against this SM "
                                                         "(trt-gemma plan) and the graph's operators")
    cache_out = bytes(memoryview(config.get_timing_cache().serialize())) if cache is not None else b""
    return bytes(memoryview(blob)), cache_out, io


def _first(errors: list[str], n: int = 2) -> str:
    return " | ".join(e.strip() for e in errors[:n]) or "no error message from the builder"


# --- running (GPU only) ------------------------------------------------------------------------------------------

def run_engine(engine_path: str | Path, feeds: dict, profile: int = 0) -> dict:
    """Run a serialized engine once with polygraphy's TrtRunner (GPU only; a typed error elsewhere)."""
    engine_path = Path(engine_path)
    meta_file = engine_path.parent / "manifest.json"
    builder = read_json_object(meta_file).get("builder", "tensorrt") if meta_file.is_file() else "tensorrt"
    b = BUILDERS[builder]
    from trt_gemma.detect import detect

    host = detect()
    why = (f"{b.name} is not installed ({b.install})" if importlib.util.find_spec(b.name) is None
           else None if host.kind != "none" else "no NVIDIA GPU on this host (engines run only on a GPU)")
    if why is None and importlib.util.find_spec("polygraphy") is None:
        why = "polygraphy is not installed (pip install polygraphy)"
    if why:
        raise DependencyError(f"cannot run {engine_path} here: {why}",
                              fix="run it on the device; the build printed the polygraphy commands that compare it "
                                  "with onnxruntime there")
    import polygraphy.config

    polygraphy.config.USE_TENSORRT_RTX = builder == "tensorrt_rtx"
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), optimization_profile=profile) as runner:
        return runner.infer(feeds)


# --- the bundle route: checkpoint -> ONNX -> engine --------------------------------------------------------------

def export_onnx_for_bundle(bundle: Path, max_seq_len: int, log: Callable[[str], None] | None = None,
                           activations: str = "float16", lm_head: str = "none", subdir: str = ONNX_DIR) -> Path:
    """BUNDLE/onnx/*.onnx (or BUNDLE/<subdir>), exported from BUNDLE/checkpoint by trt_gemma.onnx.export.export_onnx
    unless present, computing in `activations` (the recipe's dtype: the engine's activations and KV cache are the
    graph's), with the lm_head quantized as the recipe's `lm_head_quant` says."""
    onnx_dir = bundle / subdir
    existing = sorted(onnx_dir.glob("*.onnx")) if onnx_dir.is_dir() else []
    want = {"activation_dtype": activations, "lm_head": lm_head, "logits": "last", "max_seq_len": max_seq_len,
            "kv_cache": TENSORRT_KV_CACHE}
    made = _export_options(onnx_dir)
    if existing and made in (None, want):  # a graph put there by hand is used as it is
        return existing[0]
    try:
        from trt_gemma.onnx.export import export_onnx
    except ImportError as e:  # the exporter module itself, or the onnx package it needs
        raise DependencyError(f"the ONNX exporter cannot be imported ({e})",
                              fix="pip install 'trt-gemma[onnx]'") from None
    _say(log, f"exporting {bundle / 'checkpoint'} to ONNX (opset 21, max_seq_len {max_seq_len}, {activations} "
              f"activations, lm_head {lm_head})")
    # last-position logits: a prefill profile neither computes nor returns [batch, max_input_len, vocab] float32
    # the pool layout: new K/V rows out, written into the pool by the runtime (no input/output aliasing, which
    # TensorRT < 10.15 cannot express); ArgMax / TopK out, so the runtime downloads ids, not vocabulary-wide rows
    result = export_onnx(bundle / "checkpoint", onnx_dir, max_seq_len=max_seq_len, opset=21, logits="last",
                         activations=activations, lm_head=lm_head, force=made is not None,
                         kv_cache=TENSORRT_KV_CACHE)
    return _onnx_path(result, onnx_dir)


def _export_options(onnx_dir: Path) -> dict | None:
    """The options an earlier export in onnx_dir was made with (None: no export of ours there). A recipe changed since
    (another dtype, lm_head_quant) re-exports instead of building from a stale graph."""
    man = onnx_dir / "trt_gemma_onnx.json"
    if not man.is_file():
        return None
    m = read_json_object(man).get("model")
    m = m if isinstance(m, dict) else {}
    return {k: m.get(k, d) for k, d in (("activation_dtype", "float32"), ("lm_head", "none"), ("logits", "all"),
                                        ("max_seq_len", None), ("kv_cache", "concat"))}


def _onnx_path(result, onnx_dir: Path) -> Path:
    """The .onnx file an export reported: a path, an object or dict with one, else the one file in onnx_dir."""
    if isinstance(result, (str, Path)):
        return Path(result)
    for key in ("onnx_path", "model_path", "path", "onnx"):
        value = result.get(key) if isinstance(result, dict) else getattr(result, key, None)
        if value and str(value).endswith(".onnx"):
            return Path(value)
    found = sorted(onnx_dir.glob("*.onnx"))
    if len(found) != 1:
        raise InputError(f"the export wrote {len(found)} .onnx files to {onnx_dir}", fix="export to an empty dir")
    return found[0]


def tensorrt_route(bundle: Path, recipe, t: Target, *, force: bool = False, require: bool = False,
                   log: Callable[[str], None] | None = None) -> dict:
    """Export BUNDLE/checkpoint to ONNX (once) and build BUNDLE/tensorrt/model.engine for `t` with `recipe` (the
    bundle's, read by trt_gemma.build, which records the returned status in the bundle manifest). With require=False
    (a new bundle whose recipe picks this route, or a builder that must run on the device) a missing exporter, builder
    or GPU leaves the engine unbuilt with the reason and the command to run on the device; with require=True
    (`build --from-bundle B --engine tensorrt`, or `--engine tensorrt` where the builder runs on any host) it is a
    typed error."""
    check_recipe(recipe, t)
    b, why = route(t)
    status: dict = {"builder": b.name, "route": why, "onnx": None, "engine": None, "reason": None,
              "on_target": [f"trt-gemma build --from-bundle {shlex.quote(str(bundle))} --engine tensorrt"]}
    try:
        from trt_gemma.engine.plan import engine_activations

        # never float32: its engine would be larger than the weights (the embedding folded to fp32)
        onnx_path = export_onnx_for_bundle(bundle, recipe.max_seq_len, log,
                                           activations=engine_activations(recipe.dtype, t.sm),
                                           lm_head=recipe.lm_head_quant)
        status["onnx"] = str(onnx_path)
        check = _check_graph(bundle, onnx_path, recipe, log)
        built = build_engine(onnx_path, bundle / ENGINE_DIR, t, recipe,
                             precisions=tuple(recipe_precisions(recipe).values()), force=force,
                             timing_cache=bundle / TIMING_CACHE, log=log, check_onnx=check)
        status["engine"] = built.to_dict()
    except DependencyError as e:
        if require:
            raise
        status["reason"] = e.message
    return status


def _check_graph(bundle: Path, onnx_path: Path, recipe, log) -> Path:
    """The graph the printed onnxruntime check runs: the engine's own where onnxruntime's CPU EP runs its dtype, else
    a float32 export of the same checkpoint in BUNDLE/onnx-check/ (made once, reused while the recipe matches)."""
    from trt_gemma.engine.profiles import graph_inputs

    if graph_float_dtype(graph_inputs(onnx_path)) in ORT_CPU_DTYPES:
        return onnx_path
    return export_onnx_for_bundle(bundle, recipe.max_seq_len, log, activations="float32",
                                  lm_head=recipe.lm_head_quant, subdir=CHECK_ONNX_DIR)


def onnxruntime_providers() -> list[str] | None:
    """onnxruntime's execution providers in this install (None: onnxruntime absent). Importing onnxruntime is safe
    without a GPU; it lists the providers compiled in (CUDA/TensorRT ones may still need their libraries at run)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def render_builders(builders: dict, providers: list[str] | None) -> str:
    """doctor's lines: each TensorRT builder with its version, and onnxruntime's execution providers."""
    parts = [f"{n} {b['version']}" + (" (targets any SM, builds here)" if b["targets_sm"] else "")
             if b["installed"] else f"{n} (missing: {b['install']})" for n, b in builders.items()]
    eps = ", ".join(providers) if providers is not None else "onnxruntime not installed"
    return f"engine builders: {'; '.join(parts)}\nonnxruntime execution providers: {eps}"
