"""`trt-gemma build`: a target-tuned bundle anywhere, compiled to a TensorRT-LLM engine where a GPU and TRT-LLM exist.

Quantization is portable, engines are not (tied to the GPU's SM and the TensorRT version), so the work splits in two:
1. `build_bundle` (any host): target (detected or named) -> recipe -> plan (refuse what does not fit, naming the
   largest setting that does) -> quantize (INT4-AWQ / FP8 through ModelOpt) or convert (float / weight-only) ->
   quality table (the bundle's checkpoint vs the unquantized model on the shipped eval text) -> manifest. Written
   atomically: a failed build leaves nothing behind.
2. `compile_bundle` (GPU host): TensorRT-LLM >= 1.0, < 1.3 on its legacy TensorRT path, the only one with Gemma 2
   (docs/tensorrt-llm-contract.md §0, §5). BuildConfig and the equivalent `trtllm-build` argv both come
   from trt_gemma.engine.trtllm_flags. Before anything imports TensorRT, find_spec + NVML (trt_gemma.gpu_probe) must pass:
   TensorRT runtimes crash, not raise, without a GPU. Without them `build` finishes the bundle, exits 0 and prints
   what to run on the target.

Bundle layout: checkpoint/ (TRT-LLM checkpoint + tokenizer), hf_config.json (the source model's HF config.json, what
`plan` reads), recipe.toml (resolved), plan.json, quality.json/.md, manifest.json, and engine/ once compiled (engine +
tokenizer + manifest, servable on its own). Everything a step on the device needs is inside: the source model's path
is recorded in the manifest as provenance only, so a bundle copied to a host that never saw the source still plans,
serves and compiles.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trt_gemma import manifest as mf
from trt_gemma.errors import DependencyError, InputError, RecipeError
from trt_gemma.fsutil import atomic_output_dir, check_output_target, sha256_file
from trt_gemma.reference.checkpoint import CheckpointConfig
from trt_gemma.safe_io import copy_in, read_json_object
from trt_gemma.checkpoint.hf import TOKENIZER_FILES
from trt_gemma.detect import resolve_target
from trt_gemma.checkpoint.quant_block import with_shared_embedding
from trt_gemma.recipes import CALIBRATED_QUANTS, Recipe, load_recipe, resolve_recipe
from trt_gemma.targets import Target
from trt_gemma.engine.trtllm_flags import build_config_kwargs, trtllm_build_argv

BUNDLES_DIR = Path("bundles")  # default --out: ./bundles/<model>-<target>-<quant>
HF_CONFIG = "hf_config.json"  # BUNDLE/hf_config.json: the source model's config.json (the planner's input)
COPY_BLOCK_BYTES = 64 << 20  # row blocks when rewriting a rank file
QUALITY_MAX_TOKENS = 512  # eval-text tokens scored for the quality table (keeps a CPU build quick)

# Recipe weight format -> how the bundle's checkpoint is made: ModelOpt calibration or the streaming converter.
WEIGHT_ONLY = {"int8_wo": "int8", "int4_wo": "int4"}  # converter --weight-only (TRT-LLM quantizes at build)


@dataclass
class EngineResult:
    engine_dir: Path
    gpu: str
    sm: str
    engine_bytes: int
    build_seconds: float
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"engine_dir": str(self.engine_dir), "gpu": self.gpu, "sm": self.sm, "engine_bytes": self.engine_bytes,
                "build_seconds": self.build_seconds, "warnings": self.warnings}


@dataclass
class BundleResult:
    bundle_dir: Path
    target: str
    recipe: Recipe
    manifest: dict
    quality: dict | None
    engine: EngineResult | None
    not_compiled_reason: str | None
    on_target: list  # commands to run on the target when not compiled here
    notes: list = field(default_factory=list)
    trtllm_caveat: str | None = None  # no released TensorRT-LLM is known to run Gemma 2 on this target (and why)

    def to_dict(self) -> dict:
        return {"bundle_dir": str(self.bundle_dir), "target": self.target, "recipe": self.recipe.to_dict(),
                "compiled": self.engine is not None, "engine": self.engine.to_dict() if self.engine else None,
                "not_compiled_reason": self.not_compiled_reason, "on_target": self.on_target,
                "quality": self.quality, "notes": self.notes, "manifest": self.manifest,
                "trtllm_caveat": self.trtllm_caveat}


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def model_name(spec: str | None, model_dir: Path) -> str:
    if spec is None:
        from trt_gemma.assets import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(str(spec).rstrip("/")).name or model_dir.name


def make_checkpoint(model_dir: Path, out: Path, recipe: Recipe, show_progress: bool,
                    threads: int | None = None) -> Path:
    """The bundle's TRT-LLM checkpoint: ModelOpt for INT4-AWQ / FP8 (on `threads` torch threads; None: chosen from
    the free cores), else the streaming converter."""
    if recipe.quant in CALIBRATED_QUANTS:
        from trt_gemma.quant.modelopt import quantize_checkpoint

        calib = None if recipe.calib_dataset == "builtin" else recipe.calib_dataset
        return quantize_checkpoint(model_dir, out, quant=recipe.quant, group_size=recipe.group_size,
                                   kv_cache="fp8" if recipe.kv_dtype == "fp8" else None, calib_file=calib,
                                   calib_samples=recipe.calib_size, calib_seq_len=recipe.calib_max_seq_length,
                                   dtype=recipe.dtype, show_progress=show_progress, threads=threads)
    from trt_gemma.checkpoint.convert import convert_checkpoint

    dtype = recipe.quant if recipe.quant in ("bfloat16", "float16") else recipe.dtype
    return convert_checkpoint(model_dir, out, dtype=dtype, weight_only=WEIGHT_ONLY.get(recipe.quant),
                              show_progress=show_progress)


def share_embedding_table(ckpt: Path) -> None:
    """Drop lm_head.weight so the engine reuses the embedding table (saves vocab x hidden x 2 bytes).

    TRT-LLM sets `share_embedding_table` when lm_head is absent; ModelOpt's export appends "lm_head" to an explicit
    exclude_modules list (trt_gemma.checkpoint.quant_block.with_shared_embedding: a null list stays null);
    `PretrainedModel.load` tolerates the missing tensor (docs/tensorrt-llm-contract.md §3). Streams tensor by tensor,
    like the converter.
    """
    from trt_gemma.checkpoint.st_io import StreamingWriter, read_header, read_tensor

    cfg = json.loads((ckpt / "config.json").read_text())
    for rank_file in sorted(ckpt.glob("rank*.safetensors")):
        infos, meta = read_header(rank_file)
        keep = [(n, i) for n, i in infos.items() if n != "lm_head.weight"]
        tmp = rank_file.with_suffix(".tmp")
        with StreamingWriter(tmp, [(n, i.dtype, tuple(i.shape)) for n, i in keep], meta) as w:
            for name, info in keep:
                if not info.shape:
                    w.write(name, read_tensor(rank_file, info))
                    continue
                step = max(1, COPY_BLOCK_BYTES // max(1, info.nbytes // info.shape[0]))
                for start in range(0, info.shape[0], step):
                    w.write(name, read_tensor(rank_file, info, rows=slice(start, start + step)))
        tmp.replace(rank_file)
    cfg["share_embedding_table"] = True
    cfg["quantization"] = with_shared_embedding(cfg.get("quantization") or {})
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


def quality_table(model_dir: Path, ckpt: Path, work: Path, show_progress: bool) -> dict:
    """eval of the bundle's checkpoint vs the unquantized model (float32, as eval.py's own default baseline) on the
    shipped held-out eval text, both run by the numpy reference."""
    from trt_gemma.checkpoint.convert import convert_checkpoint
    from trt_gemma.eval import evaluate

    baseline = convert_checkpoint(model_dir, work / "unquantized", dtype="float32", show_progress=False)
    used = _input_hashes(ckpt, model_dir)
    changed = {f for f, h in _input_hashes(baseline, model_dir).items() if used.get(f) != h}
    if changed:  # the table would compare two different models
        raise InputError(f"{model_dir}: {', '.join(sorted(changed))} changed while the bundle was being built",
                         fix="rerun `trt-gemma build` once the model files are final")
    report = evaluate([ckpt], baseline=baseline, max_tokens=QUALITY_MAX_TOKENS, show_progress=show_progress)
    return {"report": report.to_dict(), "markdown": report.to_markdown()}


def write_recipe_toml(path: Path, recipe: Recipe, header: str) -> None:
    lines = [f"# {header}", "# Resolved recipe (target file < --set < model context); rebuild with --config this file."]
    lines += [f"{k} = {json.dumps(v)}" for k, v in recipe.to_dict().items()]  # JSON scalars are valid TOML
    path.write_text("\n".join(lines) + "\n")


def _input_hashes(ckpt: Path, model_dir: Path) -> dict:
    """sha256 of the model's input files: from the converter/quantizer provenance when it has them, else hashed."""
    prov = ckpt / "trt_gemma_provenance.json"
    if prov.is_file():
        inputs = json.loads(prov.read_text()).get("inputs") or []
        if inputs and all("sha256" in i for i in inputs):
            return {i["file"]: i["sha256"] for i in inputs}
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()}


def default_out(name: str, target: str, recipe: Recipe) -> Path:
    return BUNDLES_DIR / f"{name}-{target}-{recipe.quant}"


def on_target_commands(bundle: Path, recipe: Recipe) -> list[str]:
    """What to run on the target: our compile, the equivalent raw TRT-LLM command, then serving."""
    raw = trtllm_build_argv(recipe, bundle / "checkpoint", bundle / "engine")
    return [f"trt-gemma build --from-bundle {shlex.quote(str(bundle))}", shlex.join(raw),
            f"trt-gemma serve {shlex.quote(str(bundle / 'engine'))}"]


def build_bundle(model: str | None = None, target: str | Target | None = "auto", config_file: str | Path | None = None,
                 overrides=(), out: str | Path | None = None, force: bool = False, compile_engine: bool = True,
                 skip_quality: bool = False, show_progress: bool = True, log: Callable[[str], None] | None = None,
                 detection=None, threads: int | None = None, tensorrt_required: bool = False) -> BundleResult:
    """Make the bundle for `target` and compile it when this host can; see the module docstring. `threads`: torch
    threads for calibration (None: from the free cores, trt_gemma.quant.calibration.choose_threads).
    `tensorrt_required` (`--engine tensorrt`): refuse up front, before any work, what this host lacks for the
    TensorRT route's steps that run here (engine.build.require_route_here)."""
    from trt_gemma.checkpoint.config import ModelConfig
    from trt_gemma.gpu_probe import gpu_unavailable_reason
    from trt_gemma.checkpoint.hf import resolve_model
    from trt_gemma.plan import plan, require_fit

    t0 = time.time()
    t, how = resolve_target(target, detection)  # resolved once; the Target object travels from here
    _say(log, f"target {t.name} ({how})")
    model_dir = resolve_model(model)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    recipe, _, notes = resolve_recipe(t, config_file, overrides, cfg.max_position_embeddings)  # file < --set < context
    if tensorrt_required:
        from trt_gemma.engine.build import require_route_here

        require_route_here(t)
    p = plan(model_dir, t, recipe=recipe, recipe_notes=notes)
    require_fit(p)
    _say(log, f"plan: {p.verdict} — {p.reason}")
    name = model_name(model, model_dir)
    out = Path(out) if out is not None else default_out(name, t.name, recipe)
    check_output_target(out, force)
    with atomic_output_dir(out, force) as tmp:
        _say(log, f"{'quantizing' if recipe.quant in CALIBRATED_QUANTS else 'converting'} -> {recipe.quant}")
        ckpt = make_checkpoint(model_dir, tmp / "checkpoint", recipe, show_progress, threads)
        if recipe.share_embedding_table:
            share_embedding_table(ckpt)
        quality = None
        if not skip_quality:
            _say(log, f"quality table: {recipe.quant} vs the unquantized model ({QUALITY_MAX_TOKENS} eval tokens)")
            quality = quality_table(model_dir, ckpt, tmp / ".work", show_progress)
            shutil.rmtree(tmp / ".work", ignore_errors=True)
            (tmp / "quality.json").write_text(json.dumps(quality["report"], indent=2) + "\n")
            (tmp / "quality.md").write_text(quality["markdown"] + "\n")
        write_recipe_toml(tmp / "recipe.toml", recipe, f"trt-gemma build: {name} for {t.name}")
        copy_in(model_dir, "config.json", tmp / HF_CONFIG)
        (tmp / "plan.json").write_text(json.dumps(p.to_dict(), indent=2, default=str) + "\n")
        manifest = bundle_manifest(model, model_dir, ckpt, recipe, p, how, notes, time.time() - t0, t)
        mf.write_manifest(tmp, manifest)
    _say(log, f"bundle written: {out}")
    result = BundleResult(out, t.name, recipe, manifest, quality["report"] if quality else None, None, None, [], notes)
    reason = gpu_unavailable_reason() if compile_engine else "compile skipped (--no-compile)"
    if reason is None:
        result.engine = compile_bundle(out, log=log, detection=detection)
        result.manifest = mf.read_manifest(out)
    else:
        result.not_compiled_reason, result.on_target = reason, on_target_commands(out, recipe)
        result.trtllm_caveat = trtllm_caveat(t)
    return result


# Where the route that does run on such a target is described (the ONNX -> TensorRT path).
OTHER_ROUTE_DOC = "docs/jetson.md"


def trtllm_caveat(t: Target) -> str | None:
    """Said in the build output, not only in `plan` notes: the printed TensorRT-LLM commands are not known to work on
    this target (docs/facts/jetson.md §3, §6)."""
    if not t.trt_caveat:
        return None
    return (f"no TensorRT-LLM release for {t.title} is known to run Gemma 2: {t.trt_caveat}. The route that runs "
            f"there is ONNX -> TensorRT: see {OTHER_ROUTE_DOC}")


def bundle_manifest(spec, model_dir: Path, ckpt: Path, recipe: Recipe, p, how: str, notes: list,
                    seconds: float, t: Target) -> dict:
    ckpt_cfg = json.loads((ckpt / "config.json").read_text())
    quant = ckpt_cfg.get("quantization") or {}
    return {
        "format": mf.FORMAT, "kind": "bundle", "created_utc": mf.now_utc(),
        # "path": where the source was on the build host (provenance only: nothing reads it back); "config": the copy
        # of its config.json inside the bundle
        "model": {"id": spec if spec is not None else model_name(None, model_dir), "path": str(model_dir.resolve()),
                  "config": HF_CONFIG, "inputs_sha256": _input_hashes(ckpt, model_dir)},
        "target": {"name": t.name, "title": t.title, "sm": t.sm_str, "family": t.family, "chosen": how},
        "recipe": recipe.to_dict(),
        "quant_algo": {"weights": quant.get("quant_algo"), "kv_cache": quant.get("kv_cache_quant_algo")},
        "checkpoint": {"dir": "checkpoint", "bytes": mf.dir_bytes(ckpt), "dtype": ckpt_cfg.get("dtype"),
                       "files_sha256": {f.name: sha256_file(f) for f in sorted(ckpt.glob("rank*.safetensors"))}},
        "plan": {"verdict": p.verdict, "total_bytes": p.total_bytes, "usable_bytes": p.usable_bytes},
        "trtllm_build": trtllm_build_argv(recipe, "checkpoint", "engine"),
        "tools": mf.tool_versions(),
        "engine": mf.not_compiled("not compiled yet"),
        "bundle_seconds": round(seconds, 2),
        "notes": notes,
    }


def read_bundle(bundle: Path) -> tuple[dict, Target, Recipe]:
    """A bundle's manifest, its target (the name the manifest records, resolved here once for the command) and its
    resolved recipe.toml."""
    manifest = mf.read_manifest(bundle)
    if manifest.get("kind") != "bundle":
        raise InputError(f"{bundle} is a {manifest.get('kind')}, not a bundle", fix="pass the bundle directory")
    t, _ = resolve_target(manifest["target"]["name"])
    return manifest, t, load_recipe(t, bundle / "recipe.toml")


def tensorrt_route(bundle_dir: str | Path, *, force: bool = False, require: bool = False,
                   log: Callable[[str], None] | None = None) -> dict:
    """The bundle's TensorRT route (trt_gemma.engine.build.tensorrt_route: ONNX export, then the target's builder)
    with the bundle's own recipe and target, its outcome recorded in the manifest under "tensorrt"."""
    from trt_gemma.engine.build import tensorrt_route as build_route

    bundle = Path(bundle_dir)
    manifest, t, recipe = read_bundle(bundle)
    status = build_route(bundle, recipe, t, force=force, require=require, log=log)
    manifest["tensorrt"] = {k: v for k, v in status.items() if k != "on_target"}
    if status["engine"]:  # the builder's I/O record at a key of its own (the runtime and inspect read it), not twice
        manifest["tensorrt"]["engine"] = {k: v for k, v in status["engine"].items() if k != "io"}
        manifest["tensorrt"]["io"] = status["engine"]["io"]
    mf.write_manifest(bundle, manifest)
    return status


def compile_bundle(bundle_dir: str | Path, force: bool = False, gather_context_logits: bool = False,
                   log: Callable[[str], None] | None = None, detection=None) -> EngineResult:
    """Compile BUNDLE/checkpoint into BUNDLE/engine with TensorRT-LLM (GPU host only; typed error elsewhere)."""
    from trt_gemma.gpu_probe import gpu_unavailable_reason

    bundle = Path(bundle_dir)
    manifest, t, recipe = read_bundle(bundle)
    CheckpointConfig.from_file(bundle / "checkpoint" / "config.json")  # typed errors on any host, before the GPU check
    reason = gpu_unavailable_reason()
    if reason:
        raw = shlex.join(trtllm_build_argv(recipe, bundle / "checkpoint", bundle / "engine"))
        raise DependencyError(f"cannot compile {bundle} on this host: {reason}",
                              fix=f"run `trt-gemma build --from-bundle {bundle}` on a host with TensorRT-LLM "
                                  f">=1.0,<1.3 and an NVIDIA GPU, or there: {raw}")
    host, warnings = _check_host(recipe, t, detection)
    kwargs = build_config_kwargs(recipe, gather_context_logits=gather_context_logits)
    _say(log, f"compiling with TensorRT-LLM on {host.name} (SM {host.sm // 10}.{host.sm % 10})")
    t0 = time.time()
    with atomic_output_dir(bundle / "engine", force) as tmp:
        _trtllm_compile(bundle / "checkpoint", tmp, kwargs)
        seconds = time.time() - t0
        for name in TOKENIZER_FILES:
            if (bundle / "checkpoint" / name).is_file():
                copy_in(bundle / "checkpoint", name, tmp / name)
        engine_bytes = sum(f.stat().st_size for f in tmp.glob("rank*.engine"))
        manifest["tools"] = mf.tool_versions()
        manifest["engine"] = {"status": "compiled", "reason": None, "dir": "engine", "gpu": host.name,
                              "sm": f"{host.sm // 10}.{host.sm % 10}", "sm_int": host.sm, "bytes": engine_bytes,
                              "build_seconds": round(seconds, 2), "compiled_utc": mf.now_utc(), "warnings": warnings}
        mf.write_manifest(tmp, {**manifest, "kind": "engine"})
    mf.write_manifest(bundle, manifest)
    return EngineResult(bundle / "engine", host.name, manifest["engine"]["sm"], engine_bytes, round(seconds, 2),
                        warnings)


def _check_host(recipe: Recipe, t: Target, detection=None):
    """The host GPU can run the recipe's precisions (typed error otherwise); a different target is a warning:
    the engine then runs on this host's SM only."""
    from trt_gemma.detect import detect
    from trt_gemma.targets import supports

    host = detection if detection is not None else detect()
    for precision in (recipe.quant, "kv_fp8" if recipe.kv_dtype == "fp8" else None):
        ok, why = supports(host.sm, precision) if precision else (True, "")
        if not ok:
            raise RecipeError(f"this host's {host.name} cannot build the bundle's {precision}: {why}",
                              fix="compile on the target the bundle was made for, or rebuild the bundle for this GPU")
    warnings = []
    if t.sm != host.sm:
        warnings.append(f"bundle made for {recipe.target}, compiled on {host.name} "
                        f"(SM {host.sm // 10}.{host.sm % 10}): the engine runs on this SM only")
    return host, warnings


def _trtllm_compile(checkpoint_dir: Path, engine_dir: Path, kwargs: dict) -> None:
    """TRT-LLM 1.0-1.2 legacy TensorRT path, exactly per docs/tensorrt-llm-contract.md §5:
    GemmaForCausalLM.from_checkpoint(ckpt, rank) -> build(model, BuildConfig(...)) -> engine.save(dir), per rank.
    PluginConfig takes the CLI spellings: `from_dict` in the dataclass versions, the constructor (whose validators map
    enable/disable) in the pydantic ones — the same mapping `trtllm-build` applies to its flags."""
    assert importlib.util.find_spec("tensorrt_llm") is not None, "caller probes find_spec + NVML first"
    from tensorrt_llm import BuildConfig, build
    from tensorrt_llm.models import GemmaForCausalLM
    from tensorrt_llm.plugin import PluginConfig

    limits = {k: v for k, v in kwargs.items() if k != "plugin_config"}
    world = int(read_json_object(checkpoint_dir / "config.json")["mapping"]["world_size"])
    for rank in range(world):
        plugins = dict(kwargs["plugin_config"])
        plugin_config = (PluginConfig.from_dict(plugins) if hasattr(PluginConfig, "from_dict")
                         else PluginConfig(**plugins))
        model = GemmaForCausalLM.from_checkpoint(str(checkpoint_dir), rank=rank)
        engine = build(model, BuildConfig(**limits, plugin_config=plugin_config))
        engine.save(str(engine_dir))
