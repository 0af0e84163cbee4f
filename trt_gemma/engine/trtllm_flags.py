"""One table: our recipe fields -> TensorRT-LLM 1.2 `BuildConfig` fields and `trtllm-build` flags.

Every name below is copied from docs/tensorrt-llm-contract.md §5 (TRT commands/build.py@65f1d153,
plugin/plugin.py@c20322ff, builder.py@008b2b8d); tests/test_trtllm_flags.py checks them against a frozen copy of that
page's list. The Python compile (build.py) and the printed `trtllm-build` command both come from here, so the engine
built on a GPU host from a bundle is the same whichever way the user runs it.

Gemma 2 rules applied here (same page): max_seq_len <= 4096 ("The maximum sequence length allowed is 4096"), the GEMM
plugin `auto` for bf16/fp16/AWQ/weight-only and disabled for FP8 (README recipe table), a paged KV cache (needed for
in-flight batching), paged context FMHA off with an INT8 KV cache (that combination disables it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trt_gemma.errors import RecipeError

# docs/tensorrt-llm-contract.md §5: TRT-LLM's Gemma 2 limit (the sliding window is not modelled by TRT)
GEMMA2_MAX_SEQ_LEN = 4096
MAX_BEAM_WIDTH = 1  # greedy/sampling serving only; BuildConfig wants it set explicitly (from_dict pitfall, §5)
KV_CACHE_TYPE = "paged"  # `--kv_cache_type paged`; BuildConfig's kv_cache_type=None is the same (§5: unset -> paged)


@dataclass(frozen=True)
class Limit:
    """A build limit copied from the recipe: recipe field -> BuildConfig field -> trtllm-build flag."""

    recipe_field: str
    build_config_field: str
    cli_flag: str


# Required BuildConfig keys (the from_dict pitfall, §5): always passed explicitly, never left to defaults.
LIMITS: tuple[Limit, ...] = (
    Limit("max_batch_size", "max_batch_size", "--max_batch_size"),
    Limit("max_input_len", "max_input_len", "--max_input_len"),
    Limit("max_seq_len", "max_seq_len", "--max_seq_len"),
    Limit("max_num_tokens", "max_num_tokens", "--max_num_tokens"),
)

# Recipe weight formats whose GEMMs run through TRT-LLM's FP8 path: the GEMM plugin must stay off (§5 README table).
FP8_WEIGHT_QUANTS = frozenset({"fp8"})


@dataclass(frozen=True)
class PluginSetting:
    """A PluginConfig field (same name as its `--flag`) and how its value is chosen. Values are the CLI spellings
    (`auto|disable|enable|int`); TRT-LLM's `PluginConfig.from_dict` maps them exactly as `trtllm-build` does."""

    name: str
    why: str


PLUGINS: tuple[PluginSetting, ...] = (
    PluginSetting("gpt_attention_plugin", "auto (= model dtype): needed for the paged KV cache / in-flight batching"),
    PluginSetting("gemm_plugin", "auto for bf16/fp16/AWQ/weight-only, disable for FP8 (README recipe table)"),
    PluginSetting("context_fmha", "enable: fused attention for the prompt"),
    PluginSetting("remove_input_padding", "enable: packed batches, needed for in-flight batching"),
    PluginSetting("use_paged_context_fmha", "enable (KV reuse, chunked context) unless the KV cache is INT8"),
)


def _field(recipe: Any, name: str, default: Any = None) -> Any:
    """Read a recipe field from the recipes.py dataclass (attribute) or a plain mapping (a parsed TOML)."""
    if isinstance(recipe, dict):
        return recipe.get(name, default)
    return getattr(recipe, name, default)


def _quant(recipe: Any) -> str:
    return str(_field(recipe, "quant") or _field(recipe, "dtype") or "bfloat16")


def gemm_plugin_value(recipe: Any) -> str:
    """The recipe's gemm_plugin when set (checked against the FP8 rule), else the rule's choice."""
    fp8 = _quant(recipe) in FP8_WEIGHT_QUANTS
    chosen = _field(recipe, "gemm_plugin")
    if chosen in (None, ""):
        return "disable" if fp8 else "auto"
    chosen = "disable" if chosen in ("none", "off", False) else str(chosen)
    if fp8 and chosen != "disable":
        raise RecipeError(f"recipe field gemm_plugin = {chosen!r} with quant = 'fp8': TensorRT-LLM's GEMM plugin "
                          "does not run FP8 GEMMs for Gemma 2",
                          fix="set gemm_plugin = \"disable\" (or remove it) for FP8 recipes")
    return chosen


def check_gemma2_rules(recipe: Any) -> None:
    """Typed errors for recipes TensorRT-LLM would refuse (or silently clip) for Gemma 2."""
    for lim in LIMITS:
        value = _field(recipe, lim.recipe_field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecipeError(f"recipe field {lim.recipe_field} = {value!r} is not a positive integer",
                              fix=f"set {lim.recipe_field} in the build config (or --set {lim.recipe_field}=N)")
    seq, inp = _field(recipe, "max_seq_len"), _field(recipe, "max_input_len")
    if seq > GEMMA2_MAX_SEQ_LEN:
        raise RecipeError(f"recipe field max_seq_len = {seq} exceeds TensorRT-LLM's Gemma 2 limit of "
                          f"{GEMMA2_MAX_SEQ_LEN}", fix=f"--set max_seq_len={GEMMA2_MAX_SEQ_LEN} (or less)")
    if inp > seq:
        raise RecipeError(f"recipe field max_input_len = {inp} exceeds max_seq_len = {seq}",
                          fix=f"--set max_input_len={seq - 1} (prompt + output must fit max_seq_len)")
    gemm_plugin_value(recipe)


def plugin_values(recipe: Any) -> dict[str, str]:
    """PluginConfig settings by name, as CLI strings."""
    kv = str(_field(recipe, "kv_cache_dtype") or "auto")
    return {
        "gpt_attention_plugin": "auto",
        "gemm_plugin": gemm_plugin_value(recipe),
        "context_fmha": "enable",
        "remove_input_padding": "enable",
        "use_paged_context_fmha": "disable" if kv == "int8" else "enable",
    }


def build_config_kwargs(recipe: Any, gather_context_logits: bool = False) -> dict:
    """Keyword arguments for `tensorrt_llm.BuildConfig(...)`; `plugin_config` is a dict for `PluginConfig.from_dict`.

    kv_cache_type is left at BuildConfig's default (None -> paged, §5) rather than passing an enum whose import path
    is undocumented; the CLI form spells it out.
    """
    check_gemma2_rules(recipe)
    kwargs: dict[str, Any] = {lim.build_config_field: int(_field(recipe, lim.recipe_field)) for lim in LIMITS}
    kwargs["max_beam_width"] = MAX_BEAM_WIDTH
    if gather_context_logits:
        kwargs["gather_context_logits"] = True
    kwargs["plugin_config"] = plugin_values(recipe)
    return kwargs


def trtllm_build_argv(recipe: Any, checkpoint_dir: Any, engine_dir: Any, gather_context_logits: bool = False
                      ) -> list[str]:
    """The equivalent `trtllm-build ...` command line (argv list, first element the program)."""
    check_gemma2_rules(recipe)
    argv = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir)]
    for lim in LIMITS:
        argv += [lim.cli_flag, str(int(_field(recipe, lim.recipe_field)))]
    argv += ["--max_beam_width", str(MAX_BEAM_WIDTH), "--kv_cache_type", KV_CACHE_TYPE]
    if gather_context_logits:
        argv.append("--gather_context_logits")
    for name, value in plugin_values(recipe).items():
        argv += [f"--{name}", value]
    return argv
