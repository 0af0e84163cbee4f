"""trtllm_flags against the names TensorRT-LLM 1.2 documents, and the Gemma 2 build rules.

The lists below are a frozen copy of docs/tensorrt-llm-contract.md §5 (TRT commands/build.py@65f1d153,
plugin/plugin.py@c20322ff, builder.py@008b2b8d), not imported from trt_gemma, so a typo in the table fails here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from trt_gemma.engine import trtllm_flags
from trt_gemma.errors import RecipeError
from trt_gemma.targets import get_target

# `trtllm-build` flags named in §5 (incl. the plugin/feature flag table).
DOCUMENTED_CLI_FLAGS = frozenset({
    "--checkpoint_dir", "--output_dir", "--max_batch_size", "--max_input_len", "--max_seq_len",
    "--max_decoder_seq_len", "--max_beam_width", "--max_num_tokens", "--opt_num_tokens", "--kv_cache_type",
    "--workers", "--logits_dtype", "--gather_context_logits", "--gather_all_token_logits", "--strip_plan",
    "--weight_streaming", "--fast_build", "--dry_run", "--monitor_memory", "--profiling_verbosity",
    "--gpt_attention_plugin", "--gemm_plugin", "--context_fmha", "--remove_input_padding", "--use_paged_context_fmha",
    "--use_fp8_context_fmha", "--tokens_per_block", "--use_fused_mlp", "--multiple_profiles", "--reduce_fusion",
})
# Deprecated in 1.x per §5: must never be emitted.
DEPRECATED_CLI_FLAGS = frozenset({"--paged_kv_cache", "--gather_generation_logits", "--max_output_len", "--tp_size",
                                  "--pp_size"})
# Flags that take no value (store_true).
SWITCH_FLAGS = frozenset({"--gather_context_logits", "--gather_all_token_logits", "--strip_plan", "--weight_streaming",
                          "--fast_build", "--dry_run", "--monitor_memory"})
# `BuildConfig` fields listed in §5.
DOCUMENTED_BUILD_CONFIG_FIELDS = frozenset({
    "max_input_len", "max_seq_len", "opt_batch_size", "max_batch_size", "max_beam_width", "max_num_tokens",
    "opt_num_tokens", "kv_cache_type", "gather_context_logits", "gather_generation_logits", "strongly_typed",
    "profiling_verbosity", "use_refit", "output_timing_cache", "weight_streaming", "plugin_config", "use_strip_plan",
    "dry_run", "monitor_memory",
})
# Keys `BuildConfig.from_dict` pops (the pitfall): always passed explicitly.
FROM_DICT_REQUIRED = frozenset({"max_input_len", "max_seq_len", "max_batch_size", "max_beam_width", "max_num_tokens"})
# PluginConfig names = the plugin/feature flags without dashes; their documented values.
PLUGIN_NAMES = frozenset({"gpt_attention_plugin", "gemm_plugin", "context_fmha", "remove_input_padding",
                          "use_paged_context_fmha", "use_fp8_context_fmha", "tokens_per_block", "use_fused_mlp",
                          "multiple_profiles", "reduce_fusion"})
PLUGIN_VALUES = frozenset({"auto", "float16", "float32", "bfloat16", "int32", "disable"})
FEATURE_VALUES = frozenset({"enable", "disable"})
KV_CACHE_TYPES = frozenset({"continuous", "paged", "disabled"})
GEMMA2_MAX_SEQ_LEN = 4096

BUILD_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "build_configs").glob("*.toml"))


def _recipe(**over):
    base = {"quant": "bfloat16", "kv_cache_dtype": "bfloat16", "max_batch_size": 8, "max_input_len": 3000,
            "max_seq_len": 3100, "max_num_tokens": 8192}
    base.update(over)
    return base


def _flag_pairs(argv: list[str]) -> dict[str, str | None]:
    """argv -> {flag: value or None for switches}; fails on a stray positional value."""
    out, i = {}, 1
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"stray argument {flag!r} in {argv}"
        if flag in SWITCH_FLAGS:
            out[flag], i = None, i + 1
        else:
            out[flag], i = argv[i + 1], i + 2
    return out


def check_documented(recipe) -> tuple[dict, dict]:
    """Every name and value produced for `recipe` is a documented 1.2 one and obeys the Gemma 2 rules."""
    kwargs = trtllm_flags.build_config_kwargs(recipe)
    unknown = set(kwargs) - DOCUMENTED_BUILD_CONFIG_FIELDS
    assert not unknown, f"undocumented BuildConfig fields: {sorted(unknown)}"
    missing = FROM_DICT_REQUIRED - set(kwargs)
    assert not missing, f"required BuildConfig keys left to defaults: {sorted(missing)}"
    plugins = kwargs["plugin_config"]
    assert set(plugins) <= PLUGIN_NAMES, f"undocumented plugin names: {sorted(set(plugins) - PLUGIN_NAMES)}"
    for name, value in plugins.items():
        allowed = PLUGIN_VALUES if name.endswith("_plugin") else FEATURE_VALUES
        assert value in allowed, f"{name}={value!r} not among documented values {sorted(allowed)}"
    assert kwargs["max_seq_len"] <= GEMMA2_MAX_SEQ_LEN
    assert kwargs["max_input_len"] <= kwargs["max_seq_len"]

    argv = trtllm_flags.trtllm_build_argv(recipe, "CKPT", "ENGINE")
    assert argv[0] == "trtllm-build"
    flags = _flag_pairs(argv)
    assert set(flags) <= DOCUMENTED_CLI_FLAGS, f"undocumented flags: {sorted(set(flags) - DOCUMENTED_CLI_FLAGS)}"
    assert not set(flags) & DEPRECATED_CLI_FLAGS
    assert flags["--checkpoint_dir"] == "CKPT" and flags["--output_dir"] == "ENGINE"
    assert flags["--kv_cache_type"] in KV_CACHE_TYPES
    # The CLI and the Python BuildConfig agree on every limit and plugin.
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width"):
        assert flags[f"--{key}"] == str(kwargs[key]), key
    for name, value in plugins.items():
        assert flags[f"--{name}"] == value, name
    return kwargs, flags


@pytest.mark.parametrize("quant", ["bfloat16", "float16", "int4_awq", "int8_wo", "int4_wo"])
def test_gemm_plugin_auto_for_non_fp8(quant):
    kwargs, flags = check_documented(_recipe(quant=quant))
    assert kwargs["plugin_config"]["gemm_plugin"] == "auto" and flags["--gemm_plugin"] == "auto"
    assert flags["--gpt_attention_plugin"] == "auto" and flags["--kv_cache_type"] == "paged"


def test_gemm_plugin_disabled_for_fp8():
    kwargs, flags = check_documented(_recipe(quant="fp8", kv_cache_dtype="fp8"))
    assert kwargs["plugin_config"]["gemm_plugin"] == "disable" and flags["--gemm_plugin"] == "disable"


def test_fp8_with_gemm_plugin_auto_is_refused():
    with pytest.raises(RecipeError, match="gemm_plugin") as e:
        trtllm_flags.build_config_kwargs(_recipe(quant="fp8", gemm_plugin="auto"))
    assert "disable" in e.value.fix


def test_max_seq_len_over_4096_is_refused():
    with pytest.raises(RecipeError, match="max_seq_len = 8192") as e:
        trtllm_flags.trtllm_build_argv(_recipe(max_seq_len=8192, max_input_len=1024), "c", "e")
    assert "4096" in e.value.fix


def test_max_input_len_over_max_seq_len_is_refused():
    with pytest.raises(RecipeError, match="max_input_len = 2048 exceeds max_seq_len = 1024"):
        trtllm_flags.build_config_kwargs(_recipe(max_input_len=2048, max_seq_len=1024))


@pytest.mark.parametrize("field", ["max_batch_size", "max_num_tokens"])
def test_missing_limit_is_refused(field):
    recipe = _recipe()
    del recipe[field]
    with pytest.raises(RecipeError, match=field):
        trtllm_flags.build_config_kwargs(recipe)


def test_int8_kv_disables_paged_context_fmha():
    kwargs, _ = check_documented(_recipe(kv_cache_dtype="int8"))
    assert kwargs["plugin_config"]["use_paged_context_fmha"] == "disable"


def test_gather_context_logits_is_a_switch():
    argv = trtllm_flags.trtllm_build_argv(_recipe(), "c", "e", gather_context_logits=True)
    assert "--gather_context_logits" in _flag_pairs(argv)
    assert trtllm_flags.build_config_kwargs(_recipe(), gather_context_logits=True)["gather_context_logits"] is True


def test_table_names_are_documented():
    for lim in trtllm_flags.LIMITS:
        assert lim.build_config_field in DOCUMENTED_BUILD_CONFIG_FIELDS
        assert lim.cli_flag in DOCUMENTED_CLI_FLAGS
    assert {p.name for p in trtllm_flags.PLUGINS} <= PLUGIN_NAMES
    assert trtllm_flags.GEMMA2_MAX_SEQ_LEN == GEMMA2_MAX_SEQ_LEN


@pytest.mark.parametrize("path", BUILD_CONFIGS, ids=[p.stem for p in BUILD_CONFIGS])
def test_every_build_config_maps_to_documented_names(path):
    from trt_gemma.recipes import load_recipe

    recipe = load_recipe(get_target(path.stem))
    kwargs, flags = check_documented(recipe)
    want_gemm = "disable" if recipe.quant == "fp8" else "auto"
    assert flags["--gemm_plugin"] == want_gemm, f"{path.name}: quant={recipe.quant} gemm={flags['--gemm_plugin']}"
    assert kwargs["max_seq_len"] == recipe.max_seq_len <= GEMMA2_MAX_SEQ_LEN


def test_build_configs_exist():
    assert len(BUILD_CONFIGS) >= 20, "build_configs/*.toml missing: the per-target recipes are the input of this table"
