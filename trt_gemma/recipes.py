"""Build recipes: the per-target TOML files in build_configs/, loaded, overridden and validated.

`Recipe` is the one place defaults live (CLI options read them from here). A recipe is layered: dataclass defaults <
the target's build_configs/<target>.toml (or a user TOML) < single-field overrides (`--set key=value`). Validation
names the field, where its value came from, and the fix. Limits and precision rules: docs/tensorrt-llm-contract.md §5
(max_seq_len <= 4096 for Gemma 2; gemm plugin off for FP8) and trt_gemma.targets.RULES (FP8 needs SM >= 8.9,
INT4/INT8 rejected on SM 10.0-11.9, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Mapping, Sequence

from trt_gemma.errors import ConfigError, InputError, RecipeError
from trt_gemma.targets import Target, sm_str, support_level

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

GEMMA2_MAX_SEQ_LEN = 4096  # TRT-LLM: "The maximum sequence length allowed is 4096." (docs/tensorrt-llm-contract.md §5)
QUANTS = ("bfloat16", "float16", "int8_wo", "int4_wo", "int4_awq", "fp8")
CALIBRATED_QUANTS = frozenset({"int4_awq", "fp8"})  # made by ModelOpt calibration (quant/modelopt.py), the rest by checkpoint/convert.py
DTYPES = ("bfloat16", "float16")
KV_DTYPES = ("auto", "bfloat16", "float16", "fp8", "int8")
GEMM_PLUGINS = ("auto", "disable", "float16", "bfloat16", "float32")
# tensorrt_llm: TRT-LLM checkpoint -> TRT-LLM engine; tensorrt: ONNX graph -> TensorRT / TensorRT-RTX engine
# (trt_gemma.engine.rules picks the builder from the target)
ENGINES = ("tensorrt_llm", "tensorrt")
# lm_head quantization, TensorRT route only (its ONNX export writes the head as int8 per vocab row or int4 in blocks
# of 128: trt_gemma.onnx.weights; the TensorRT-LLM checkpoint keeps it in the model dtype)
LM_HEAD_QUANTS = ("none", "int8", "int4")
# TRT-LLM's groupwise weight-only GEMM (fpA_intB) takes group sizes 64 and 128; ModelOpt/Edge-LLM default to 128.
GROUP_SIZES = (64, 128)
CALIB_DEFAULT = "builtin"  # the embedded offline calibration text (trt_gemma.assets.calib_text_path())


@dataclass(frozen=True)
class Recipe:
    target: str
    quant: str = "bfloat16"
    dtype: str = "bfloat16"
    group_size: int = 128
    kv_cache_dtype: str = "auto"
    max_batch_size: int = 8
    max_input_len: int = 3072
    max_seq_len: int = 4096
    max_num_tokens: int = 8192
    gemm_plugin: str = "auto"
    kv_cache_free_gpu_memory_fraction: float = 0.9
    kv_cache_max_tokens: int = 0  # 0 = no cap (TOML has no null)
    share_embedding_table: bool = False
    calib_dataset: str = CALIB_DEFAULT
    calib_size: int = 512
    calib_max_seq_length: int = 512
    calib_seed: int = 1234
    engine: str = "tensorrt_llm"
    lm_head_quant: str = "none"

    @property
    def kv_dtype(self) -> str:
        """The KV-cache dtype with "auto" resolved to the activation dtype."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


FIELD_TYPES: dict[str, type] = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[f.type]
                                 for f in dataclasses.fields(Recipe)}
DEFAULTS = Recipe(target="")


def default(field_name: str):
    """A field's default value (CLI options read their defaults here)."""
    return getattr(DEFAULTS, field_name)


def config_path(target: str) -> Path:
    """The packaged build_configs/<target>.toml (shipped as package data trt_gemma.build_configs)."""
    return Path(str(files("trt_gemma.build_configs").joinpath(f"{target}.toml")))


def load_recipe(target: Target, config_file: str | Path | None = None,
                overrides: Mapping[str, object] | Sequence[str] | None = None) -> Recipe:
    """Defaults < TOML (the target's own unless `config_file`) < overrides; validated against the target."""
    return resolve_recipe(target, config_file, overrides)[0]


def resolve_recipe(t: Target, config_file: str | Path | None = None,
                   overrides: Mapping[str, object] | Sequence[str] | None = None,
                   max_positions: int | None = None) -> tuple[Recipe, dict, list[str]]:
    """The recipe a build or plan uses, validated once: (recipe, the overrides that reproduce it from the same file,
    notes). Beyond the layering of `load_recipe`, two limits follow others the user changed, each said in a note:
    - max_input_len from the file or defaults shrinks with a smaller `--set max_seq_len` (ratio kept), so
      `--set max_seq_len=2048` alone works; an explicit `--set max_input_len` is never changed (validation names it);
    - with `max_positions` (the model's max_position_embeddings), limits beyond the model's context are clamped to it
      (TensorRT-LLM would build 4096 regardless).
    `t` is the Target the command resolved (detect.resolve_target): nothing here looks a name up again."""
    path = Path(config_file) if config_file is not None else config_path(t.name)
    values: dict = {}
    origin: dict[str, str] = {}
    for key, value in _read_toml(path).items():
        values[key], origin[key] = value, str(path)
    before = dict(values)
    over = parse_overrides(overrides)
    for key, value in over.items():
        values[key], origin[key] = value, f"--set {key}={_plain(value)}"
    file_target = values.pop("target", t.name)
    if file_target != t.name:
        raise RecipeError(f"{origin['target']}: target = {file_target!r} but the recipe is loaded for {t.name!r}",
                          fix=f"use --target {file_target}, or change `target` in {origin['target']}")
    _check_keys_and_types(values, origin, before, f"{t.name} recipe" if config_file is None else str(path))
    notes = []
    # in turn: the model clamp sees the prompt length the sequence length already brought down
    for derive in (lambda: _follow_seq_len(values, before, over), lambda: _fit_values(values, max_positions)):
        derived = derive()
        if derived:
            notes.append(derived.pop("note"))
            for key, value in derived.items():
                where = origin.get(key, "recipe default").removesuffix(" (clamped)")
                values[key], origin[key], over[key] = value, f"{where} (clamped)", value
    recipe = Recipe(target=t.name, **values)
    validate(recipe, t, origin)
    return recipe, over, notes


def _follow_seq_len(values: dict, before: dict, over: dict) -> dict:
    """max_input_len (not set by --set) scaled down with a --set max_seq_len below it, keeping the recipe's ratio."""
    if "max_seq_len" not in over or "max_input_len" in over:
        return {}
    seq, inp = values["max_seq_len"], values.get("max_input_len", default("max_input_len"))
    if seq < 1 or inp <= seq:
        return {}
    new = max(1, inp * seq // max(inp, before.get("max_seq_len", default("max_seq_len"))))
    return {"max_input_len": new, "note": f"max_input_len {inp} -> {new}: it must not exceed --set max_seq_len={seq} "
                                          "(set max_input_len yourself to choose another value)"}


def _fit_values(values: dict, max_positions: int | None) -> dict:
    if max_positions is None:
        return {}
    seq = values.get("max_seq_len", default("max_seq_len"))
    inp = values.get("max_input_len", default("max_input_len"))
    if seq <= max_positions or seq > GEMMA2_MAX_SEQ_LEN:  # over the limit: validation says so, as without a model
        return {}
    scaled_input = max(1, inp * max_positions // seq)
    clamp = {"max_seq_len": max_positions, "max_input_len": min(inp, scaled_input)}
    clamp["note"] = (f"max_seq_len {seq} -> {max_positions}, max_input_len {inp} -> {clamp['max_input_len']}: the "
                     f"model's max_position_embeddings is {max_positions}")
    return clamp


def fit_to_model(recipe: Recipe, max_positions: int) -> dict:
    """Overrides that keep `recipe` within the model's trained context ({} when it already is); resolve_recipe
    applies the same clamp while layering."""
    clamp = _fit_values(recipe.to_dict(), max_positions)
    clamp.pop("note", None)
    return clamp


def parse_overrides(overrides: Mapping[str, object] | Sequence[str] | None) -> dict:
    """{"k": v} as is; ["k=v", ...] with v read as a TOML value (bare words stay strings: quant=int4_awq)."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key=value", fix="write e.g. --set max_seq_len=2048")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()
    return out


def _read_toml(path: Path) -> dict:
    from trt_gemma.safe_io import read_toml

    if not Path(path).exists() and not Path(path).is_symlink():
        raise InputError(f"recipe file {path} not found",
                         fix="pass an existing TOML (see build_configs/ for examples) or drop --config")
    try:
        return read_toml(path, fix="pass a recipe TOML of plain tables (see build_configs/ for examples)")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", fix="fix the TOML syntax (see build_configs/)") from None
    except OSError as e:  # a directory, no read permission, ...
        raise InputError(f"recipe file {path} cannot be read: {e.strerror or e}",
                         fix="pass a readable TOML file (see build_configs/ for examples)") from None


def _check_keys_and_types(values: dict, origin: dict, file_values: dict | None = None, file_name: str = "") -> None:
    """Unknown keys and wrong types, named with their source. The fix quotes the value this recipe would otherwise
    have: the recipe file's (`file_values`, read from `file_name`) or the dataclass default."""
    file_values = file_values or {}
    for key, value in values.items():
        if key not in FIELD_TYPES or key == "target":
            close = difflib.get_close_matches(key, FIELD_TYPES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{origin[key]}: unknown recipe field {key!r}",
                              fix=f"{hint}known fields: {', '.join(k for k in FIELD_TYPES if k != 'target')}")
        want = FIELD_TYPES[key]
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[key], ok = float(value), True
        if not ok:
            from_file = key in file_values and file_values[key] is not value and _valid(file_values[key], want)
            label, fallback = (file_name, file_values[key]) if from_file else ("default", default(key))
            raise ConfigError(f"{origin[key]}: field {key!r} must be {want.__name__}, got {value!r}",
                              fix=f"set {key} to a value of type {want.__name__} ({label}: {_toml_repr(fallback)})")


def _valid(value, want: type) -> bool:
    return isinstance(value, want) and not (want is not bool and isinstance(value, bool)) or \
        (want is float and isinstance(value, int) and not isinstance(value, bool))


def _choice(recipe: Recipe, key: str, choices: tuple, origin: dict) -> None:
    value = getattr(recipe, key)
    if value not in choices:
        raise ConfigError(f"{_where(origin, key)}: {key} = {value!r} is not one of {', '.join(map(str, choices))}",
                          fix=f"use --set {key}=<{'|'.join(map(str, choices))}>")


def validate(recipe: Recipe, target: Target, origin: dict | None = None) -> None:
    """Raise ConfigError/RecipeError naming the field, its source and the fix."""
    origin = origin or {}
    for key, choices in (("quant", QUANTS), ("dtype", DTYPES), ("kv_cache_dtype", KV_DTYPES),
                         ("gemm_plugin", GEMM_PLUGINS), ("group_size", GROUP_SIZES), ("engine", ENGINES),
                         ("lm_head_quant", LM_HEAD_QUANTS)):
        _choice(recipe, key, choices, origin)
    if recipe.lm_head_quant != "none" and recipe.engine != "tensorrt":
        raise RecipeError(f"{_where(origin, 'lm_head_quant')}: lm_head_quant = {recipe.lm_head_quant!r} with engine = "
                          f"{recipe.engine!r} (from {_where(origin, 'engine')}): only the TensorRT route's ONNX export "
                          "quantizes lm_head; the TensorRT-LLM checkpoint keeps it in the model dtype",
                          fix="add --engine tensorrt (or --set engine=tensorrt), or use --set lm_head_quant=none")
    _check_limits(recipe, origin)
    _check_precisions(recipe, target, origin)
    _check_kv_cache_source(recipe, origin)
    _check_plugins_and_memory(recipe, target, origin)
    if recipe.engine == "tensorrt":  # the builder's own precision refusals, before any export or build
        from trt_gemma.engine.rules import check_recipe

        check_recipe(recipe, target, origin)


def _check_limits(r: Recipe, origin: dict) -> None:
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "calib_size",
                "calib_max_seq_length"):
        if getattr(r, key) < 1:
            raise ConfigError(f"{_where(origin, key)}: {key} = {getattr(r, key)} must be >= 1",
                              fix=f"use --set {key}=<positive integer>")
    if r.max_seq_len > GEMMA2_MAX_SEQ_LEN:
        raise RecipeError(f"{_where(origin, 'max_seq_len')}: max_seq_len = {r.max_seq_len} exceeds TensorRT-LLM's "
                          f"Gemma 2 limit of {GEMMA2_MAX_SEQ_LEN}", fix=f"use --set max_seq_len={GEMMA2_MAX_SEQ_LEN}")
    if r.max_input_len > r.max_seq_len:
        raise RecipeError(f"{_where(origin, 'max_input_len')}: max_input_len = {r.max_input_len} is larger than "
                          f"max_seq_len = {r.max_seq_len} (from {_where(origin, 'max_seq_len')}; a prompt must "
                          "leave room for output)",
                          fix=f"use --set max_input_len={max(1, r.max_seq_len // 2)} or raise max_seq_len")
    if r.max_input_len > r.max_num_tokens:
        # without chunked context (ModelRunnerCpp's default) TRT-LLM serves prompts of at most
        # min(max_seq_len - 1, max_num_tokens) tokens (NVIDIA/TensorRT-LLM #6539): the rest of max_input_len is dead
        raise RecipeError(f"{_where(origin, 'max_input_len')}: max_input_len = {r.max_input_len} is larger than "
                          f"max_num_tokens = {r.max_num_tokens} (from {_where(origin, 'max_num_tokens')}); "
                          "TensorRT-LLM runs a prompt in one step of at most max_num_tokens tokens",
                          fix=f"use --set max_num_tokens={r.max_input_len} or --set max_input_len={r.max_num_tokens}")
    if not 0.0 < r.kv_cache_free_gpu_memory_fraction <= 1.0:
        raise ConfigError(f"{_where(origin, 'kv_cache_free_gpu_memory_fraction')}: kv_cache_free_gpu_memory_fraction "
                          f"= {r.kv_cache_free_gpu_memory_fraction} must be in (0, 1]",
                          fix="use --set kv_cache_free_gpu_memory_fraction=0.9 (dGPU) or 0.2 (Jetson)")
    if r.kv_cache_max_tokens < 0:
        raise ConfigError(f"{_where(origin, 'kv_cache_max_tokens')}: kv_cache_max_tokens must be >= 0 (0 = no cap)",
                          fix="use --set kv_cache_max_tokens=0")


def _check_precisions(r: Recipe, t: Target, origin: dict) -> None:
    suggestion = _recommended_quant(t)
    checks = (("quant", r.quant, r.quant, f"use --set quant={suggestion}"),
              ("dtype", r.dtype, r.dtype, "use --set dtype=float16"),
              ("kv_cache_dtype", "kv_" + r.kv_dtype if r.kv_dtype in ("fp8", "int8") else r.kv_dtype,
               f"{r.kv_dtype} KV cache",
               "use --set kv_cache_dtype=auto"))
    for key, precision, shown, fix in checks:
        level, reason = support_level(t, precision)
        if level == "no":
            raise RecipeError(f"{_where(origin, key)}: --target {t.name} cannot run {_label(shown)} "
                              f"(SM {sm_str(t.sm)}): {reason.split(': ', 1)[1]}", fix=fix)


def _check_kv_cache_source(r: Recipe, origin: dict) -> None:
    """A quantized KV cache needs scales, and only ModelOpt calibration (int4_awq / fp8 recipes) makes them; our
    quantizer emits FP8 KV only."""
    if r.kv_dtype == "int8":
        raise RecipeError(f"{_where(origin, 'kv_cache_dtype')}: kv_cache_dtype = 'int8' is not produced by "
                          "trt_gemma's quantizer (FP8 KV only)", fix="use --set kv_cache_dtype=fp8 (SM >= 8.9) or auto")
    if r.kv_dtype == "fp8" and r.quant not in CALIBRATED_QUANTS:
        raise RecipeError(f"{_where(origin, 'kv_cache_dtype')}: kv_cache_dtype = 'fp8' with quant = {r.quant!r}: the "
                          "KV-cache scales come from ModelOpt calibration, which runs for int4_awq / fp8 recipes only",
                          fix="use --set kv_cache_dtype=auto, or --set quant=fp8 / int4_awq")


def _check_plugins_and_memory(r: Recipe, t: Target, origin: dict) -> None:
    if r.quant == "fp8" and r.gemm_plugin != "disable":
        raise RecipeError(f"{_where(origin, 'gemm_plugin')}: gemm_plugin = {r.gemm_plugin!r} with FP8 weights "
                          "(the gemm plugin is for non-quantized GEMMs; TRT-LLM's Gemma README builds FP8 without it)",
                          fix="use --set gemm_plugin=disable")
    if t.unified and r.kv_cache_max_tokens == 0:
        raise RecipeError(f"{_where(origin, 'kv_cache_max_tokens')}: kv_cache_max_tokens = 0 (no cap) on {t.name}: "
                          "on unified memory TRT-LLM's KV pool takes a fraction of FREE memory and starves the host "
                          "(#2773)", fix=f"use --set kv_cache_max_tokens={r.max_batch_size * r.max_seq_len}")
    if 0 < r.kv_cache_max_tokens < r.max_seq_len:
        raise RecipeError(f"{_where(origin, 'kv_cache_max_tokens')}: kv_cache_max_tokens = {r.kv_cache_max_tokens} "
                          f"cannot hold one max_seq_len = {r.max_seq_len} sequence",
                          fix=f"use --set kv_cache_max_tokens={r.max_seq_len} (or more)")


def _recommended_quant(t: Target) -> str:
    try:
        return str(_read_toml(config_path(t.name)).get("quant", "bfloat16"))
    except (InputError, ConfigError):
        return "bfloat16"


def _label(precision: str) -> str:
    return {"fp8": "FP8", "int4_awq": "INT4-AWQ", "int4_wo": "INT4 weight-only", "int8_wo": "INT8 weight-only",
            "int8": "INT8 KV", "bfloat16": "bf16"}.get(precision, precision)


def _where(origin: dict, key: str) -> str:
    return origin.get(key, "recipe default")


def _plain(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _toml_repr(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else str(v)
