"""`trt-gemma build` (bundle -> engine where possible) and `trt-gemma inspect` (what is it, can it run here)."""
from __future__ import annotations


import click

from trt_gemma.console import human_size as _size
from trt_gemma.console import plain as _out
from trt_gemma.recipes import ENGINES


@click.command("build")
@click.option("--model", default=None, help="HF dir or hub id (default: the embedded model).")
@click.option("--target", default="auto", show_default=True,
              help="Target name (`trt-gemma targets`); auto = detect, or the default target on a GPU-less host.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Recipe TOML instead of build_configs/<target>.toml.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe field (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Bundle dir (default: ./bundles/<model>-<target>-<quant>).")
@click.option("--force", is_flag=True, help="Replace an existing bundle (or engine, with --from-bundle).")
@click.option("--from-bundle", "from_bundle", type=click.Path(file_okay=False), default=None,
              help="Compile a bundle made elsewhere into BUNDLE/engine (needs TensorRT-LLM and a GPU).")
@click.option("--skip-quality", is_flag=True, help="Do not compute the quality table (large models on slow hosts).")
@click.option("--no-compile", is_flag=True, help="Only make the bundle, even on a GPU host.")
@click.option("--engine", type=click.Choice(ENGINES), default=None,
              help="Engine route (default: the recipe's `engine`): tensorrt_llm, or tensorrt = ONNX -> TensorRT "
                   "(Jetson, data center) / TensorRT-RTX (RTX; builds on any host).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Torch threads for calibration on CPU [default: the cores available minus the current load].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(model, target, config_file, overrides, out, force, from_bundle, skip_quality, no_compile, engine, threads,
          as_json):
    """Build a target-tuned bundle (quantized TensorRT-LLM checkpoint, recipe, plan, quality table, manifest) and
    compile it into a TensorRT-LLM engine when this host has TensorRT-LLM and a GPU; otherwise print what to run
    on the target."""
    from trt_gemma.build import build_bundle, compile_bundle
    from trt_gemma.console import emit, err_console
    from trt_gemma.errors import ConfigError

    log = None if as_json else (lambda msg: err_console.print(f"[dim]build:[/] {msg}"))
    if from_bundle:
        given = [n for n, v in (("--model", model), ("--config", config_file), ("--set", overrides), ("--out", out),
                                ("--threads", threads)) if v] + (["--target"] if target != "auto" else [])
        if given:
            raise ConfigError(f"--from-bundle compiles the bundle as it is; {', '.join(given)} cannot change it",
                              fix="drop those options, or rebuild the bundle with them (without --from-bundle)")
        if engine == "tensorrt":
            from trt_gemma.commands.engine import compile_tensorrt

            compile_tensorrt(from_bundle, force, as_json, log)
            return
        engine = compile_bundle(from_bundle, force=force, log=log)
        emit(engine.to_dict(), as_json, _render_engine)
        return
    overrides = list(overrides) + ([f"engine={engine}"] if engine else [])
    result = build_bundle(model, target, config_file, overrides, out, force,
                          compile_engine=not no_compile and engine != "tensorrt",
                          skip_quality=skip_quality, show_progress=not as_json, log=log, threads=threads,
                          tensorrt_required=engine == "tensorrt")
    from trt_gemma.commands.engine import with_tensorrt_route

    emit(with_tensorrt_route(result, engine, no_compile, log), as_json, _render_bundle)


def _render_engine(e: dict) -> None:
    _out(f"engine: {e['engine_dir']}  ({_size(e['engine_bytes'])}, built on {e['gpu']} SM {e['sm']} "
         f"in {e['build_seconds']:.1f} s)")
    for w in e["warnings"]:
        _out(f"warning: {w}")
    _out(f"serve it:  trt-gemma serve {e['engine_dir']}")


def _render_bundle(r: dict) -> None:
    from trt_gemma.build import QUALITY_MAX_TOKENS

    recipe, m = r["recipe"], r["manifest"]
    _out(f"bundle: {r['bundle_dir']}")
    _out(f"  model {m['model']['id']} -> {recipe['quant']} (KV {recipe['kv_cache_dtype']}) for {r['target']} "
         f"(SM {m['target']['sm']}); checkpoint {_size(m['checkpoint']['bytes'])}; plan: {m['plan']['verdict']}")
    for note in r["notes"]:
        _out(f"  note: {note}")
    if r["quality"]:
        _out(f"\nquality ({QUALITY_MAX_TOKENS} tokens of the shipped eval text, vs the unquantized model):")
        _out(_quality_lines(r["quality"]))
    if r["compiled"]:
        _out("")
        _render_engine(r["engine"])
        return
    _out(f"\nnot compiled here: {r['not_compiled_reason']}")
    if r.get("trtllm_caveat"):
        _out(f"warning: {r['trtllm_caveat']}")
    _out("On the target (TensorRT-LLM >=1.0,<1.3 and its NVIDIA GPU), copy this bundle there and run:")
    _out(f"  {r['on_target'][0]}")
    _out("or the same build with TensorRT-LLM's own CLI:")
    _out(f"  {r['on_target'][1]}")
    _out("then serve it:")
    _out(f"  {r['on_target'][2]}")
    if r.get("tensorrt"):
        from trt_gemma.commands.engine import render_tensorrt

        render_tensorrt(r["tensorrt"])
    if m["target"]["family"] == "jetson":
        _out("Jetson: see docs/jetson.md (swap, nvpmodel, the ONNX -> TensorRT route); the bundle also runs here "
             f"on the CPU (onnxruntime where installed, else the numpy reference): trt-gemma serve {r['bundle_dir']}")


def _quality_lines(q: dict) -> str:
    """The quality rows against the baseline's perplexity (quality.md has the same table in Markdown)."""
    base = (q.get("baseline") or {}).get("perplexity")
    lines = [f"  baseline (unquantized) perplexity {base:.4f}" if base else "  baseline: see quality.json",
             f"  {'checkpoint':<12} {'weights':<10} {'KV':<6} {'perplexity':>11} {'vs base':>8} {'top-1':>8} "
             f"{'mean KL':>9}"]
    for r in q.get("rows") or []:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        lines.append(f"  {r['name']:<12} {r.get('quant_algo') or r.get('dtype', '-'):<10} "
                     f"{r.get('kv_cache_quant_algo') or '-':<6} {r['perplexity']:>11.4f} {delta:>8} "
                     f"{100 * r['top1_agreement']:>7.2f}% {r['mean_kl']:>9.5f}")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per path.")
def inspect(paths, as_json):
    """Describe bundles and engine dirs: contents, target, recipe, quality, and whether THIS host can run them."""
    from trt_gemma.console import emit
    from trt_gemma.detect import detect

    detection = detect()  # once for all paths
    items = [_inspect_one(p, detection) for p in paths]
    emit(items, as_json, lambda xs: [_render_inspect(x) for x in xs])


def _inspect_one(path: str, detection) -> dict:
    """A Triton repository written by export-triton, else a bundle or engine dir."""
    from pathlib import Path

    from trt_gemma.manifest import inspect_path
    from trt_gemma.deploy.triton import EXPORT_MANIFEST
    from trt_gemma.deploy.inspect import inspect_repository

    if (Path(path) / EXPORT_MANIFEST).is_file():
        return inspect_repository(path)
    return inspect_path(path, detection=detection)


def _render_inspect(x: dict) -> None:
    if x["kind"] == "triton-repository":
        from trt_gemma.commands.export_triton import _render_inspect as render_repository

        render_repository(x)
        return
    _out(f"{x['path']}: {x['kind']}")
    if x.get("note"):
        _out(f"  note: {x['note']}")
    _out(f"  model {x['model']}  target {x['target']}  quant {x['quant']} (KV {x['kv_cache_dtype']})")
    if x["kind"] == "tensorrt-engine":
        from trt_gemma.commands.engine import render_tensorrt_inspect

        render_tensorrt_inspect(x)
        return
    limits = ", ".join(f"{k}={v}" for k, v in x["limits"].items() if v is not None)
    if limits:
        _out(f"  limits: {limits}")
    for c in x["contents"]:
        _out(f"    {c['name']:<28} {_size(c['bytes']):>12}")
    eng = x.get("engine") or {}
    if eng:
        where = f"on {eng.get('gpu')} (SM {eng.get('sm')})" if eng.get("status") == "compiled" else ""
        _out(f"  TensorRT-LLM engine: {eng.get('status')} {where}".rstrip())
    if x.get("tensorrt"):
        from trt_gemma.commands.engine import render_tensorrt_facts

        render_tensorrt_facts(x["tensorrt"])
    if x.get("quality"):
        _out(_quality_lines(x["quality"]))
    _out(f"  this host: {x['host']['device']}; tensorrt_llm {x['host']['tensorrt_llm']}")
    for c in x["checks"]:
        _out(f"    [{ {True: 'ok', False: 'no', None: '??'}[c['ok']]}] {c['name']}: {c['detail']}")
    _out(f"  can run here: {'yes' if x['can_run_here'] else 'no'}")
    _out(f"  next: {x['next']}")
