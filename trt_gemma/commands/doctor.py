"""`trt-gemma doctor`: Python and package versions, which extras import, NVML/Jetson state, what this host can do.

Nothing heavy is imported: packages are found with importlib.util.find_spec (top-level names only, which does not
import them) and versions read with importlib.metadata. TensorRT-LLM is never imported (it segfaults or fails without
a GPU, docs/tensorrt-llm-contract.md §0); gpu_probe asks NVML instead.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
import sys

import click

CORE = {"numpy": "numpy", "safetensors": "safetensors", "click": "click", "rich": "rich", "tokenizers": "tokenizers",
        "nvidia-ml-py": "pynvml", "huggingface_hub": "huggingface_hub", "psutil": "psutil"}
# extra -> {distribution: import name}, as in pyproject.toml
EXTRAS = {
    "quantize": {"nvidia-modelopt": "modelopt", "torch": "torch", "transformers": "transformers",
                 "requests": "requests", "accelerate": "accelerate"},
    "onnx": {"onnx": "onnx", "onnxruntime": "onnxruntime", "ml_dtypes": "ml_dtypes"},
    "serve": {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus-client": "prometheus_client"},
    "gpu": {"tensorrt-llm": "tensorrt_llm"},
    # the TensorRT route's runtime: device memory and streams (runtime/cuda_memory.py); TensorRT itself is listed
    # under the engine builders (JetPack's python3-libnvinfer or the tensorrt wheel; tensorrt-rtx on RTX)
    "tensorrt": {"onnx": "onnx", "polygraphy": "polygraphy", "cuda-python": "cuda"},
}
# How to install an extra where `pip install 'trt-gemma[extra]'` does not work: PyPI has only a stub sdist for
# tensorrt-llm; the wheels are on NVIDIA's index (TensorRT-LLM 1.0 docs, installation/linux.html: CUDA toolkit and
# libopenmpi-dev first, on a GPU host). The pin is the `gpu` extra's in pyproject.toml.
TRTLLM_SPEC = "tensorrt-llm>=1.0,<1.3"
INSTALL = {"gpu": f"pip install '{TRTLLM_SPEC}' --extra-index-url https://pypi.nvidia.com (on the GPU host, after the "
                  "CUDA toolkit and libopenmpi-dev)"}
# what each command family needs: extras that must import fully, plus whether a GPU is required. "build bundles" is
# the README's main job: the shipped recipes are mostly INT4-AWQ / FP8, which calibrate through ModelOpt.
CAPABILITIES = {
    "plan": ((), False), "convert": ((), False), "generate": ((), False), "quantize": (("quantize",), False),
    "build bundles": (("quantize",), False), "build engines": (("gpu",), True), "serve": (("serve",), False),
}


def _package(dist: str, module: str) -> dict:
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = None
    found = importlib.util.find_spec(module) is not None
    return {"distribution": dist, "module": module, "version": version, "importable": found}


def stale_pynvml() -> dict | None:
    """The deprecated `pynvml` distribution ships its own pynvml module that can shadow nvidia-ml-py's."""
    try:
        version = md.version("pynvml")
    except md.PackageNotFoundError:
        return None
    return {"version": version, "message": f"the deprecated `pynvml` distribution {version} is installed and can "
            "shadow nvidia-ml-py's pynvml module",
            "fix": "pip uninstall -y pynvml && pip install --force-reinstall nvidia-ml-py"}


def report() -> dict:
    from trt_gemma import __version__
    from trt_gemma.detect import detect
    from trt_gemma.gpu_probe import nvml_device_count

    extras = {name: {d: _package(d, m) for d, m in pkgs.items()} for name, pkgs in EXTRAS.items()}
    extra_ok = {name: all(p["importable"] for p in pkgs.values()) for name, pkgs in extras.items()}
    gpu_count, no_gpu = nvml_device_count()
    can = {}
    for cap, (needs, gpu) in CAPABILITIES.items():
        missing = [e for e in needs if not extra_ok[e]]
        pypi = [e for e in missing if e not in INSTALL]
        reasons = [f"install the extra: pip install 'trt-gemma[{','.join(pypi)}]'"] if pypi else []
        reasons += [f"install {e}: {INSTALL[e]}" for e in missing if e in INSTALL]
        if gpu and gpu_count == 0:
            reasons.append(no_gpu or "no NVIDIA GPU found by NVML")
        can[cap] = {"ok": not reasons, "why": "; ".join(reasons) or None}
    from trt_gemma.engine.build import available_builders, onnxruntime_providers
    from trt_gemma.runtime.tensorrt import unavailable_reason

    why = unavailable_reason()
    can["run TensorRT engines"] = {"ok": why is None, "why": why}
    return {"trt_gemma": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "core": {d: _package(d, m) for d, m in CORE.items()}, "extras": extras, "extras_ok": extra_ok,
            "stale_pynvml": stale_pynvml(), "device": detect().to_dict(), "can": can,
            "builders": available_builders(), "onnxruntime_providers": onnxruntime_providers()}


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json):
    """Versions, extras and what this host can do (plan, convert, quantize, build engines, serve)."""
    from trt_gemma.console import emit

    emit(report(), as_json, _render)


def _render(r: dict) -> None:
    from rich.markup import escape

    from trt_gemma.console import console

    console.print(f"trt_gemma {r['trt_gemma']} on Python {r['python']} ({r['platform']})")
    for title, pkgs in [("core", r["core"])] + [(f"extra [{k}]", v) for k, v in r["extras"].items()]:
        parts = [f"{d} {p['version'] or '-'}" + ("" if p["importable"] else " [red](missing)[/]")
                 for d, p in pkgs.items()]
        console.print(f"{escape(title)}: " + ", ".join(parts))
    if r["stale_pynvml"]:
        console.print(f"[yellow]warning:[/] {escape(r['stale_pynvml']['message'])}\n"
                      f"  fix: {escape(r['stale_pynvml']['fix'])}")
    console.print(f"device: {escape(r['device']['message'])}")
    from trt_gemma.engine.build import render_builders

    console.print(escape(render_builders(r["builders"], r["onnxruntime_providers"])))
    for cap, v in r["can"].items():
        mark = "[green]yes[/]" if v["ok"] else "[red]no[/]"
        console.print(f"  {cap:20s} {mark}" + ("" if v["ok"] else f"  - {escape(v['why'])}"))
