"""The build-side stages as functions with typed results: the same functions the CLI commands call.

    from trt_gemma.stages import plan, convert, quantize, build, evaluate

    p = plan("gemma-2-2b", target="jetson-orin-nano-8gb")      # -> Plan (p.verdict, p.total_bytes, p.suggestion)
    ckpt = convert(None, "out/ckpt")                           # -> Path of a TensorRT-LLM checkpoint
    bundle = build(target="rtx-4090", overrides=["quant=bfloat16", "kv_cache_dtype=auto"],
                   skip_quality=True)                      # -> Bundle
    report = evaluate([ckpt])                                  # -> EvalReport (perplexity, top-1, KL)

They live here rather than as `trt_gemma.plan(...)` because `trt_gemma.plan`, `.convert`, `.quantize` and `.build`
are the stage modules themselves. `convert`, `quantize`, `build` and `evaluate` are the stage functions as they are
(`convert_checkpoint`, `quantize_checkpoint`, `build_bundle`, `eval.evaluate`: their signatures and defaults, no
second copy); `plan` adds what `trt-gemma plan` does around the stage function: "auto" targets and bundles.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from trt_gemma.build import BundleResult as Bundle
from trt_gemma.build import EngineResult as Engine
from trt_gemma.build import build_bundle as build
from trt_gemma.build import compile_bundle
from trt_gemma.checkpoint.convert import convert_checkpoint as convert
from trt_gemma.errors import InputError
from trt_gemma.eval import EvalReport, EvalRow, evaluate
from trt_gemma.plan import Plan
from trt_gemma.quant.modelopt import quantize_checkpoint as quantize

__all__ = ["plan", "convert", "quantize", "build", "compile_bundle", "evaluate", "Plan", "Bundle", "Engine",
           "EvalReport", "EvalRow"]


def plan(model: str | os.PathLike[str] | None = None, target: str = "auto", *,
         overrides: Mapping[str, Any] | Sequence[str] | None = None,
         config_file: str | os.PathLike[str] | None = None) -> Plan:
    """Will `model` fit `target`? Memory by class, a verdict, the largest settings that fit, a decode roofline.

    `model`: None / "default" (the embedded model), a preset ("gemma-2-2b", ...), a local HF dir, a hub id, or a
    `trt-gemma build` bundle (the model config it carries with the bundle's recipe, for the target asked: "does this
    bundle fit this device"; its source model need not be on this host). `target`: a name from `trt-gemma targets`,
    or "auto" (this device, else the default target, as `trt-gemma plan` chooses). `overrides`: recipe fields
    ({"quant": "int4_awq"} or ["quant=int4_awq"]).
    Raises InputError (model), ConfigError / RecipeError (target, recipe fields). Not fitting is a verdict, not an
    error: `p.fits` is False (plan.require_fit(p) raises FitError, as the CLI does)."""
    from trt_gemma.checkpoint.config import PRESETS
    from trt_gemma.detect import resolve_target
    from trt_gemma.plan import plan as run
    from trt_gemma.recipes import parse_overrides

    t, _how = resolve_target(target)
    spec, name = ("default" if model is None else os.fspath(model)), None
    over = parse_overrides(overrides)
    path = Path(spec).expanduser()
    # a local dir may be a bundle; a hub id is left to the planner, which fetches its config.json only
    if spec not in PRESETS and spec != "default" and path.is_dir():
        from trt_gemma.runtime.backends import detect_kind
        from trt_gemma.safe_io import check_tree

        check_tree(path)  # a refused entry is the answer, not "no weights" below
        try:
            kind = detect_kind(path)
        except InputError:  # no weights beside config.json: planning needs the config only (the planner checks it)
            kind = "hf"
        if kind == "bundle":
            spec, name, recipe = _bundle_source(path)
            over = {**recipe, **over}
        elif kind == "hf":
            spec = str(path)
        else:
            raise InputError(f"{path} is a {kind.replace('_', ' ')}: planning needs the model's Hugging Face config",
                             fix="plan its source model (HF dir, hub id or preset), or its bundle")
    return run(spec, t, overrides=over or None, config_file=config_file, name=name)


# Recipe fields that describe the bundle's engine (its weights, KV cache and limits), not the target it was built for
_BUNDLE_FIELDS = ("quant", "group_size", "kv_cache_dtype", "dtype", "max_batch_size", "max_seq_len", "max_input_len",
                  "max_num_tokens", "share_embedding_table")


def _bundle_source(bundle: Path) -> tuple[str, str, dict[str, Any]]:
    """(the model config the bundle carries, the model's name, the recipe fields to plan with) from the bundle alone:
    its source model need not exist here."""
    from trt_gemma.build import HF_CONFIG
    from trt_gemma.manifest import read_manifest
    from trt_gemma.safe_io import resolve_in

    m = read_manifest(bundle)
    model = m.get("model") or {}
    config = resolve_in(bundle, str(model.get("config") or HF_CONFIG), source=bundle / "manifest.json")
    if not config.is_file():
        raise InputError(f"{bundle} carries no {config.name} (the source model's config.json, which planning needs): "
                         "it was built by an older trt_gemma", fix="rebuild the bundle (`trt-gemma build --force`), "
                                                                    "or plan its source model with the bundle's recipe")
    recipe = m.get("recipe") or {}
    return str(config), str(model.get("id") or bundle.name), {k: recipe[k] for k in _BUNDLE_FIELDS if k in recipe}
