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
exact commands that compare an engine against onnxruntime on the device.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trt_gemma.errors import DependencyError, InputError, RecipeError
from trt_gemma.fsutil import atomic_output_dir
from trt_gemma.engine.rules import (BUILDERS, Builder, check_recipe, recipe_precisions, refusal,  # noqa: F401
                                    route)
from trt_gemma.targets import Target, get_target, sm_str

ENGINE_DIR = "tensorrt"  # BUNDLE/tensorrt/: model.engine + manifest.json + profiles
ENGINE_FILE = "model.engine"
TIMING_CACHE = "tensorrt.timing.cache"  # at the bundle root, so a --force rebuild of the engine keeps it
ONNX_DIR = "onnx"
TENSORRT_KV_CACHE = "pool"  # the graph contract engines are built from (trt_gemma/onnx/pool.py)


def builder_version(builder: Builder) -> str | None:
    for dist in builder.distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def available_builders() -> dict[str, dict]:
    """{name: {"installed", "version", "targets_sm"}} without importing anything (doctor)."""
    out = {}
    for name, b in BUILDERS.items():
        found = importlib.util.find_spec(b.name) is not None
        out[name] = {"installed": found, "version": builder_version(b) if found else None,
                     "targets_sm": b.targets_sm, "install": b.install}
    return out


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

    def to_dict(self) -> dict:
        return {"engine_path": str(self.engine_path), "builder": self.builder, "builder_version": self.builder_version,
                "sm": self.sm, "profiles": {k: {n: [list(s) for s in v] for n, v in p.items()}
                                            for k, p in self.profiles.items()},
                "engine_bytes": self.engine_bytes, "build_seconds": self.build_seconds,
                "timing_cache": self.timing_cache, "onnx": self.onnx, "check_commands": self.check_commands,
                "warnings": self.warnings}


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def build_engine(onnx_path: str | Path, out_dir: str | Path, target: str | Target, limits, *,
                 precisions: tuple[str, ...] = (), force: bool = False, timing_cache: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> EngineBuild:
    """Compile `onnx_path` into OUT_DIR/model.engine for `target` with its route's builder (atomic: on any error
    nothing is left). `precisions` (the recipe's quant/dtype) are re-checked against the installed builder version;
    `timing_cache` is read if present and written back (builders whose cache is a no-op skip it)."""
    from trt_gemma.engine.profiles import Limits, graph_inputs, polygraphy_commands, profiles

    t = get_target(target)
    b, _ = route(t)
    why = _unavailable_reason(b)
    if why:
        raise DependencyError(f"cannot build a {b.name} engine for {t.name} here: {why}",
                              fix=f"run the build where {b.name} and {'any host' if b.targets_sm else 'the GPU'} "
                                  f"exist ({b.install})")
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
        blob, cache_out = _compile(b, Path(onnx_path), sm, profs, cache_in)
        (tmp / ENGINE_FILE).write_bytes(blob)
        seconds = round(time.time() - t0, 2)
        result = EngineBuild(out / ENGINE_FILE, b.name, version, sm_str(sm), profs, len(blob), seconds,
                             str(cache_path) if cache_path else None, str(onnx_path),
                             polygraphy_commands(onnx_path, out / ENGINE_FILE, inputs, lim, b.name, out), warnings)
        (tmp / "manifest.json").write_text(json.dumps({"kind": "tensorrt-engine", "target": t.name,
                                                        **result.to_dict()}, indent=2) + "\n")
    if cache_path is not None and cache_out:
        tmp_cache = cache_path.with_suffix(".tmp")
        tmp_cache.write_bytes(cache_out)
        tmp_cache.replace(cache_path)
    _say(log, f"engine: {result.engine_path} ({len(blob):,} bytes, {seconds:.1f} s)")
    return result


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


def _collecting_logger(trt):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            # TensorRT-RTX on a GPU-less host logs CUDA error 35 and carries on: not a build failure
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR) and "cudaError 35" not in msg:
                self.errors.append(msg)
    return _Logger()


def _compile(b: Builder, onnx_path: Path, sm: int, profs: dict, cache_in: bytes) -> tuple[bytes, bytes]:
    trt = importlib.import_module(b.name)
    logger = _collecting_logger(trt)
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
    for shapes in profs.values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise InputError(f"{b.name} failed to build an engine for SM {sm_str(sm)} from {onnx_path}: "
                         f"{_first(logger.errors)}", fix="check the recipe's precisions against this SM "
                                                         "(trt-gemma plan) and the graph's operators")
    cache_out = bytes(memoryview(config.get_timing_cache().serialize())) if cache is not None else b""
    return bytes(memoryview(blob)), cache_out


def _first(errors: list[str], n: int = 2) -> str:
    return " | ".join(e.strip() for e in errors[:n]) or "no error message from the builder"


# --- running (GPU only) ------------------------------------------------------------------------------------------

def run_engine(engine_path: str | Path, feeds: dict, profile: int = 0) -> dict:
    """Run a serialized engine once with polygraphy's TrtRunner (GPU only; a typed error elsewhere)."""
    engine_path = Path(engine_path)
    meta_file = engine_path.parent / "manifest.json"
    builder = json.loads(meta_file.read_text()).get("builder", "tensorrt") if meta_file.is_file() else "tensorrt"
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
                           activations: str = "float16", lm_head: str = "none") -> Path:
    """BUNDLE/onnx/*.onnx, exported from BUNDLE/checkpoint by trt_gemma.onnx.export.export_onnx unless present,
    computing in `activations` (the recipe's dtype: the engine's activations and KV cache are the graph's), with the
    lm_head quantized as the recipe's `lm_head_quant` says."""
    onnx_dir = bundle / ONNX_DIR
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
    m = json.loads(man.read_text()).get("model", {})
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


def tensorrt_route(bundle_dir: str | Path, *, force: bool = False, require: bool = False,
                   log: Callable[[str], None] | None = None) -> dict:
    """Export BUNDLE/checkpoint to ONNX (once) and build BUNDLE/tensorrt/model.engine with the target's builder;
    record both in the bundle manifest under "tensorrt". With require=False (a new bundle) a missing exporter,
    builder or GPU leaves the engine unbuilt with the reason and the command to run on the device; with
    require=True (`build --from-bundle B --engine tensorrt`) it is a typed error."""
    from trt_gemma import manifest as mf
    from trt_gemma.recipes import load_recipe

    bundle = Path(bundle_dir)
    manifest = mf.read_manifest(bundle)
    if manifest.get("kind") != "bundle":
        raise InputError(f"{bundle} is a {manifest.get('kind')}, not a bundle", fix="pass the bundle directory")
    recipe = load_recipe(manifest["target"]["name"], bundle / "recipe.toml")
    check_recipe(recipe, recipe.target)
    b, why = route(recipe.target)
    status: dict = {"builder": b.name, "route": why, "onnx": None, "engine": None, "reason": None,
              "on_target": [f"trt-gemma build --from-bundle {shlex.quote(str(bundle))} --engine tensorrt"]}
    try:
        onnx_path = export_onnx_for_bundle(bundle, recipe.max_seq_len, log, activations=recipe.dtype,
                                           lm_head=recipe.lm_head_quant)
        status["onnx"] = str(onnx_path)
        built = build_engine(onnx_path, bundle / ENGINE_DIR, recipe.target, recipe,
                             precisions=tuple(recipe_precisions(recipe).values()), force=force,
                             timing_cache=bundle / TIMING_CACHE, log=log)
        status["engine"] = built.to_dict()
    except DependencyError as e:
        if require:
            raise
        status["reason"] = e.message
    manifest["tensorrt"] = {k: v for k, v in status.items() if k != "on_target"}
    mf.write_manifest(bundle, manifest)
    return status


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
