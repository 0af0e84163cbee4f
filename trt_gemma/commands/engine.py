"""The TensorRT route inside `trt-gemma build` (`--engine tensorrt`): run it after the bundle, print its outcome."""
from __future__ import annotations

from typing import Callable

from trt_gemma.console import plain as _out


def with_tensorrt_route(result, engine: str | None, no_compile: bool, log: Callable[[str], None] | None) -> dict:
    """The bundle result as a dict, plus the TensorRT route's outcome when the recipe's engine is tensorrt."""
    data = result.to_dict()
    if no_compile or result.recipe.engine != "tensorrt":
        return data
    from trt_gemma.build import tensorrt_route
    from trt_gemma.engine.rules import route
    from trt_gemma.targets import get_target

    if engine == "tensorrt":  # build_bundle was told not to compile TensorRT-LLM
        data["not_compiled_reason"] = "TensorRT-LLM compile skipped (--engine tensorrt)"
    # asked for by name and buildable on any host: not building it is an error, not "build it on the device"
    required = engine == "tensorrt" and route(get_target(result.target))[0].targets_sm
    data["tensorrt"] = tensorrt_route(result.bundle_dir, require=required, log=log)
    return data


def compile_tensorrt(bundle: str, force: bool, as_json: bool, log: Callable[[str], None] | None) -> None:
    """`build --from-bundle B --engine tensorrt`: export (if needed) and build on this host, or a typed error."""
    from trt_gemma.console import emit
    from trt_gemma.build import tensorrt_route

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


def render_tensorrt_facts(t: dict) -> None:
    """inspect's TensorRT engine block: what build recorded, then whether this host can run it."""
    from trt_gemma.console import human_size as _size
    from trt_gemma.engine.inspect import profile_lines

    if not t["built"]:
        _out(f"  TensorRT engine ({t['builder']}): not built: {t['reason']}")
        return
    size = _size(t["engine_bytes"]) if t["engine_bytes"] is not None else "size not recorded"
    precisions = "/".join(dict.fromkeys(t["precisions"] or [])) or "not recorded"  # quant/dtype, each once
    _out(f"  TensorRT engine: {t['engine_file']}  ({size}, {t['builder']} {t['builder_version']}, SM {t['sm']}, "
         f"precisions {precisions}, activations {t['activation_dtype'] or 'not recorded'})")
    for line in profile_lines(t["profiles"]):
        _out(f"    profile {line}")
    if t["not_recorded"]:
        _out(f"    not recorded by its build: {', '.join(t['not_recorded'])} (rebuild with --force to record them)")
    for c in t["checks"]:
        _out(f"    [{ {True: 'ok', False: 'no', None: '??'}[c['ok']]}] {c['name']}: {c['detail']}")
    _out(f"    TensorRT engine can run here: {'yes' if t['can_run_here'] else 'no: ' + t['why_not']}")


def render_tensorrt_inspect(x: dict) -> None:
    """inspect of BUNDLE/tensorrt: the engine block, the directory's files and what to do next."""
    from trt_gemma.console import human_size as _size

    for c in x["contents"]:
        _out(f"    {c['name']:<28} {_size(c['bytes']):>12}")
    render_tensorrt_facts(x["tensorrt"])
    _out(f"  this host: {x['host']['device']}")
    _out(f"  can run here: {'yes' if x['can_run_here'] else 'no'}")
    _out(f"  next: {x['next']}")
