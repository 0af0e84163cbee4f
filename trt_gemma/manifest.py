"""Bundle/engine manifests (what was built from what, with which tools, for which GPU) and `inspect`.

A manifest is plain JSON beside the artifact. Tool versions are read from package metadata and NVML, never by
importing tensorrt/tensorrt_llm (they crash or fail to import on a GPU-less host, docs/tensorrt-llm-contract.md §0);
anything absent is recorded as "unavailable" so a manifest written on a CPU host says so instead of guessing.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

from trt_gemma.errors import InputError
from trt_gemma.safe_io import check_tree, read_json_object

MANIFEST = "manifest.json"
FORMAT = "trt_gemma.bundle/1"
# What readers take from a manifest without looking again: field -> type (checked by read_manifest)
MANIFEST_FIELDS = {"kind": str, "model": dict, "target": dict, "recipe": dict, "engine": dict}
UNAVAILABLE = "unavailable"
NOT_COMPILED = "not compiled"
# Python distributions whose versions go into a manifest (first installed name wins).
TOOL_DISTRIBUTIONS = {"tensorrt_llm": ("tensorrt_llm", "tensorrt-llm"),
                      "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs")}


def _dist_version(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return UNAVAILABLE


def _nvml_versions() -> dict[str, str]:
    """Driver and the CUDA version the driver supports, through NVML (safe without a GPU: it raises, we record)."""
    out = {"cuda": UNAVAILABLE, "driver": UNAVAILABLE}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError or NVMLError_LibraryNotFound/DriverNotLoaded: no NVIDIA stack here
        return out
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = drv.decode() if isinstance(drv, bytes) else str(drv)
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
        out["cuda"] = f"{cuda // 1000}.{(cuda % 1000) // 10}"
    except pynvml.NVMLError:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return out


def tool_versions() -> dict[str, str]:
    from trt_gemma import __version__

    tools = {"trt_gemma": __version__}
    tools.update({key: _dist_version(names) for key, names in TOOL_DISTRIBUTIONS.items()})
    tools.update(_nvml_versions())
    return tools


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def read_manifest(path: Path) -> dict:
    """The manifest of a bundle or engine dir, after the whole dir passed safe_io.check_tree (the one check every
    command that opens a bundle goes through: no link out, loop or dangling link anywhere in it)."""
    fix = "rebuild the bundle with `trt-gemma build --force`, or copy it again from where it was built"
    check_tree(path, fix=fix)
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise InputError(f"{path} has no {MANIFEST}: not a trt_gemma bundle or engine",
                         fix="make one with `trt-gemma build`")
    data = read_json_object(f, fix=fix)
    if data.get("format") != FORMAT:
        raise InputError(f"{f}: format {data.get('format')!r}, expected {FORMAT!r}",
                         fix="rebuild the bundle with this trt_gemma version (`trt-gemma build --force`)")
    for name, kind in MANIFEST_FIELDS.items():
        if not isinstance(data.get(name), kind):
            raise InputError(f"{f}: field {name!r} is {data.get(name)!r}, expected {kind.__name__}", fix=fix)
    if not isinstance(data["target"].get("name"), str):
        raise InputError(f"{f}: field 'target.name' is {data['target'].get('name')!r}, expected str", fix=fix)
    return data


def write_manifest(path: Path, data: dict) -> None:
    """Write atomically (a new temp file + rename) so a reader never sees half a manifest, and never through a link
    placed in the bundle."""
    from trt_gemma.fsutil import atomic_write

    atomic_write(Path(path) / MANIFEST, json.dumps(data, indent=2, sort_keys=False) + "\n")


def not_compiled(reason: str) -> dict:
    return {"status": NOT_COMPILED, "reason": reason, "dir": None, "gpu": NOT_COMPILED, "sm": NOT_COMPILED,
            "bytes": None, "build_seconds": None}


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- inspect ------------------------------------------------------------------------------------------------------

def _kind(path: Path) -> str:
    from trt_gemma.runtime.trtllm import is_engine_dir

    if is_engine_dir(path):
        return "engine"
    if (path / MANIFEST).is_file() and (path / "checkpoint").is_dir():
        return "bundle"
    raise InputError(f"{path} is neither a trt_gemma bundle (manifest.json + checkpoint/) nor a TensorRT-LLM engine "
                     "dir (config.json + rank0.engine)", fix="point at a directory written by `trt-gemma build`")


def _contents(path: Path) -> list[dict]:
    rows = []
    for p in sorted(path.iterdir()):
        if p.name.startswith("."):
            continue
        rows.append({"name": p.name + ("/" if p.is_dir() else ""), "bytes": dir_bytes(p) if p.is_dir() else
                     p.stat().st_size})
    return rows


def host_facts(detection=None) -> dict:
    """What this host has: the detected GPU (or none), tensorrt_llm, the reason a compile/serve cannot run here."""
    from trt_gemma.detect import detect
    from trt_gemma.gpu_probe import gpu_unavailable_reason

    d = detection if detection is not None else detect()
    return {"device": d.message, "kind": d.kind, "gpu": d.name, "sm": d.sm, "memory_bytes": d.memory_bytes,
            "target": d.target, "tensorrt_llm": _dist_version(TOOL_DISTRIBUTIONS["tensorrt_llm"])
            if importlib.util.find_spec("tensorrt_llm") else UNAVAILABLE,
            "gpu_unavailable_reason": gpu_unavailable_reason()}


def run_checks(manifest: dict, host: dict, engine: bool) -> list[dict]:
    """Can THIS host run the artifact? Each check: name, ok, detail. Rules: precision support by SM from
    trt_gemma.targets; memory from the plan; engines are tied to the GPU (SM) and TensorRT-LLM version they were
    built with (docs/tensorrt-llm-contract.md §5: `preprocess_weights` is SM-specific); tensorrt_llm must be
    importable."""
    from trt_gemma.targets import supports

    checks = [{"name": "tensorrt_llm", "ok": host["tensorrt_llm"] != UNAVAILABLE,
               "detail": f"tensorrt_llm {host['tensorrt_llm']}"}]
    if host["sm"] is None:
        checks.append({"name": "gpu", "ok": False, "detail": host["device"]})
        return checks
    recipe = manifest.get("recipe", {})
    kv = recipe.get("kv_cache_dtype", "auto")
    for precision in (recipe.get("quant", "bfloat16"), f"kv_{kv}" if kv in ("fp8", "int8") else None):
        if precision:
            ok, why = supports(int(host["sm"]), precision)
            checks.append({"name": f"precision {precision}", "ok": ok, "detail": why})
    need = (manifest.get("plan") or {}).get("total_bytes")
    if need and host["memory_bytes"]:
        checks.append({"name": "memory", "ok": need <= host["memory_bytes"],
                       "detail": f"plan needs {need / 2**30:.2f} GiB, host has {host['memory_bytes'] / 2**30:.2f} GiB"})
    eng = manifest.get("engine") or {}
    if eng.get("status") == "compiled":
        built_sm = eng.get("sm_int")
        checks.append({"name": "engine SM", "ok": built_sm == host["sm"],
                       "detail": f"engine built on {eng.get('gpu')} (SM {eng.get('sm')}); engines only run on the SM "
                                 "they were built for"})
        built_trt = (manifest.get("tools") or {}).get("tensorrt_llm")
        checks.append({"name": "engine tensorrt_llm", "ok": built_trt == host["tensorrt_llm"],
                       "detail": f"built with tensorrt_llm {built_trt}, host has {host['tensorrt_llm']}"})
    elif engine:  # a raw `trtllm-build` output: who built it, for which SM, is not recorded anywhere we can read
        checks.append({"name": "engine SM", "ok": None,
                       "detail": "unknown (no trt_gemma manifest); engines only run on the SM they were built for"})
    return checks


# TRT-LLM QuantAlgo (checkpoint/engine pretrained_config) -> our precision names (trt_gemma.targets.PRECISIONS)
QUANT_ALGO_PRECISION = {"W4A16_AWQ": "int4_awq", "FP8": "fp8", "W8A16": "int8_wo", "W4A16": "int4_wo"}


def engine_facts(path: Path) -> dict:
    """A minimal manifest for an engine dir nobody recorded: precisions and limits from its config.json (§5)."""
    cfg = read_json_object(path / "config.json", fix="point at an engine dir written by trtllm-build or trt-gemma")
    pre, build = cfg.get("pretrained_config") or {}, cfg.get("build_config") or {}
    quant = pre.get("quantization") or {}
    recipe = {"quant": QUANT_ALGO_PRECISION.get(quant.get("quant_algo"), pre.get("dtype", "bfloat16")),
              "kv_cache_dtype": {"FP8": "fp8", "INT8": "int8"}.get(quant.get("kv_cache_quant_algo"), "auto")}
    recipe.update({k: build.get(k) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")})
    return {"recipe": recipe, "quant_algo": {"weights": quant.get("quant_algo"),
                                             "kv_cache": quant.get("kv_cache_quant_algo")},
            "tools": {"tensorrt_llm": cfg.get("version")}}


def inspect_path(path: str | Path, detection=None) -> dict:
    """Describe a bundle, a TensorRT-LLM engine dir or a bundle's TensorRT engine dir (BUNDLE/tensorrt) and whether
    this host can compile/run it."""
    from trt_gemma.engine import inspect as trt_inspect

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a directory", fix="pass a bundle or engine dir written by `trt-gemma build`")
    check_tree(path, fix="copy the bundle or engine dir again from where it was built")
    if trt_inspect.is_engine_dir(path):
        return _inspect_tensorrt_dir(path, host_facts(detection))
    kind = _kind(path)
    recorded = kind == "bundle" or (path / MANIFEST).is_file()
    manifest = read_manifest(path) if recorded else engine_facts(path)
    host = host_facts(detection)
    checks = run_checks(manifest, host, engine=kind == "engine")
    can_run = all(c["ok"] is not False for c in checks)  # None = unknown: said in the check, not blocking
    out = {"path": str(path), "kind": kind, "model": (manifest.get("model") or {}).get("id"),
           "target": (manifest.get("target") or {}).get("name"), "quant": (manifest.get("recipe") or {}).get("quant"),
           "kv_cache_dtype": (manifest.get("recipe") or {}).get("kv_cache_dtype"),
           "quant_algo": manifest.get("quant_algo"), "limits": _limits(manifest.get("recipe") or {}),
           "contents": _contents(path), "engine": manifest.get("engine"), "quality": _quality(path),
           "host": host, "checks": checks, "can_run_here": can_run, "next": _next_step(path, kind, manifest, can_run),
           "tensorrt": trt_inspect.describe(path, manifest.get("tensorrt"), host) if kind == "bundle" else None}
    if not recorded:
        out["note"] = "engine dir without a trt_gemma manifest: precisions and limits read from its config.json"
    return out


def _inspect_tensorrt_dir(path: Path, host: dict) -> dict:
    """BUNDLE/tensorrt: the engine's recorded facts and checks; model and recipe from its bundle when beside one."""
    from trt_gemma.engine import inspect as trt_inspect

    bundle = path.parent
    manifest = read_manifest(bundle) if (bundle / MANIFEST).is_file() and (bundle / "checkpoint").is_dir() else {}
    trt = trt_inspect.describe(path, manifest.get("tensorrt"), host)
    record = trt["record"]
    recipe = manifest.get("recipe") or {}
    device_check = trt_inspect.device_check_command(trt, path)
    where = f"a GPU of SM {trt['sm']} with {trt['builder']} {trt['builder_version']}"
    return {"path": str(path), "kind": "tensorrt-engine", "model": (manifest.get("model") or {}).get("id"),
            "target": record.get("target") or (manifest.get("target") or {}).get("name"),
            "quant": recipe.get("quant"), "kv_cache_dtype": recipe.get("kv_cache_dtype"), "limits": _limits(recipe),
            "contents": _contents(path), "tensorrt": trt, "host": host, "checks": trt["checks"],
            "can_run_here": trt["can_run_here"],
            "next": (f"check it against onnxruntime: {device_check}" if trt["can_run_here"] else
                     f"run it on {where}" + (f": {device_check}" if device_check else ""))}


def _limits(recipe: dict) -> dict:
    return {k: recipe.get(k) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")}


def _quality(path: Path) -> dict | None:
    """The bundle's quality report (baseline + rows), None when absent or unreadable."""
    f = path / "quality.json"
    if not f.is_file():
        return None
    try:
        q = read_json_object(f)
    except InputError:
        return None
    return {"baseline": q.get("baseline"), "tokens": q.get("tokens"), "rows": q.get("rows")}


def _next_step(path: Path, kind: str, manifest: dict, can_run: bool) -> str:
    eng = manifest.get("engine") or {}
    if kind == "bundle" and eng.get("status") != "compiled":
        if can_run:
            return f"trt-gemma build --from-bundle {path}"
        return (f"on the target (with tensorrt_llm and its GPU): trt-gemma build --from-bundle {path}; "
                f"here the checkpoint runs on the CPU: trt-gemma serve {path / 'checkpoint'}")
    engine = path if kind == "engine" else path / "engine"
    if can_run:
        return f"trt-gemma serve {engine}"
    bundle = path if kind == "bundle" else path.parent
    if (bundle / MANIFEST).is_file() and (bundle / "checkpoint").is_dir():
        built_with = (manifest.get("tools") or {}).get("tensorrt_llm")
        return (f"serve it on a {eng.get('gpu') or 'matching'} host with tensorrt_llm {built_with}, or recompile on "
                f"this one: trt-gemma build --from-bundle {bundle} --force")
    return f"serve it on the GPU it was built for: trt-gemma serve {engine}"
