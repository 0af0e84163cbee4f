"""The TensorRT route inside `trt-gemma build` (`--engine tensorrt`): run it after the bundle, print its outcome."""
from __future__ import annotations

from typing import Callable

from trt_gemma.console import plain as _out


def with_tensorrt_route(result, engine: str | None, no_compile: bool, log: Callable[[str], None] | None) -> dict:
    """The bundle result as a dict, plus the TensorRT route's outcome when the recipe's engine is tensorrt."""
    data = result.to_dict()
    if no_compile or result.recipe.engine != "tensorrt":
        return data
    from trt_gemma.engine.build import route, tensorrt_route

    if engine == "tensorrt":  # build_bundle was told not to compile TensorRT-LLM
        data["not_compiled_reason"] = "TensorRT-LLM compile skipped (--engine tensorrt)"
    # asked for by name and buildable on any host: not building it is an error, not "build it on the device"
    required = engine == "tensorrt" and route(result.recipe.target)[0].targets_sm
    data["tensorrt"] = tensorrt_route(result.bundle_dir, require=required, log=log)
    return data


def compile_tensorrt(bundle: str, force: bool, as_json: bool, log: Callable[[str], None] | None) -> None:
    """`build --from-bundle B --engine tensorrt`: export (if needed) and build on this host, or a typed error."""
    from trt_gemma.console import emit
    from trt_gemma.engine.build import tensorrt_route

    emit(tensorrt_route(bundle, force=force, require=True, log=log), as_json, render_tensorrt)


def render_tensorrt(t: dict) -> None:
    """The engine and the commands that check it on the device, or why it was not built and what to run there."""
    from trt_gemma.console import human_size as _size

    _out("")
    _out(f"TensorRT route: {t['builder']} ({t['route']})")
    e = t["engine"]
    if e:
        _out(f"engine: {e['engine_path']}  ({_size(e['engine_bytes'])}, {e['builder']} {e['builder_version']} "
             f"for SM {e['sm']}, profiles {', '.join(e['profiles'])}, {e['build_seconds']:.1f} s)")
        for w in e["warnings"]:
            _out(f"warning: {w}")
        if e["check_commands"]:
            here, device = e["check_commands"]
            _out("compare it with onnxruntime (polygraphy); first on any host, onnxruntime on the CPU:")
            _out(f"  {here}")
            _out("then on the device, from the same directory, once the bundle (with the files just saved in it) is "
                 "copied there:")
            _out(f"  {device}")
        return
    _out(f"engine not built here: {t['reason']}")
    _out("On the device, with the bundle copied there:")
    for cmd in t["on_target"]:
        _out(f"  {cmd}")
