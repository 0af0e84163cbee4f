"""Every build_configs file loads, validates and fits its own target; every bad input names the field, source and fix."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from trt_gemma.errors import ConfigError, InputError, RecipeError
from trt_gemma.plan import plan
from trt_gemma.recipes import DEFAULTS, FIELD_TYPES, Recipe, config_path, load_recipe, parse_overrides
from trt_gemma.targets import TARGETS, supports
from trt_gemma.targets import get_target

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "build_configs"
CONFIG_FILES = sorted(REPO_CONFIGS.glob("*.toml"))


def test_one_config_per_target_and_packaged():
    assert sorted(p.stem for p in CONFIG_FILES) == sorted(TARGETS)
    packaged = {p.name for p in files("trt_gemma.build_configs").iterdir() if p.name.endswith(".toml")}
    assert packaged == {p.name for p in CONFIG_FILES}
    assert config_path("h100").is_file()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_validates_and_fits(path):
    r = load_recipe(get_target(path.stem))
    assert r.target == path.stem
    assert supports(TARGETS[r.target], r.quant)[0]
    assert r.max_seq_len <= 4096 and r.max_input_len <= min(r.max_seq_len, r.max_num_tokens)
    if r.quant == "fp8":
        assert r.gemm_plugin == "disable"
    p = plan("gemma-2-2b", get_target(r.target))
    # the 4 GB module's recipe is tight on its TensorRT route (fits without the 10% margin), as its TOML says
    assert p.verdict == "fits" or (r.target == "jetson-orin-nano-4gb" and p.verdict == "tight"), \
        f"{r.target}: {p.reason}"
    assert p.total_bytes <= (0.9 if p.verdict == "fits" else 1.0) * TARGETS[r.target].usable_bytes


def test_recommended_recipes_follow_the_reference():
    # docs/facts/targets.md §1: Orin -> INT4-AWQ g128; Ada/Hopper -> FP8 + FP8 KV; SM 10.x -> FP8 (INT4/INT8 rejected);
    # T4 fp16
    for name, t in TARGETS.items():
        r = load_recipe(get_target(name))
        if t.sm == 87:
            assert (r.quant, r.group_size) == ("int4_awq", 128), name
            assert r.kv_cache_max_tokens > 0 and r.kv_cache_free_gpu_memory_fraction <= 0.3, name
        if t.sm in (89, 90) or 100 <= t.sm <= 119:
            assert (r.quant, r.kv_cache_dtype) == ("fp8", "fp8"), name
    assert load_recipe(get_target("t4")).dtype == "float16" and load_recipe(get_target("t4")).kv_dtype == "float16"


def test_defaults_live_in_the_dataclass():
    assert DEFAULTS.max_seq_len == Recipe(target="x").max_seq_len == 4096
    assert set(FIELD_TYPES) == {f for f in Recipe.__dataclass_fields__}
    assert Recipe(target="x", kv_cache_dtype="auto", dtype="float16").kv_dtype == "float16"


def test_user_toml_and_overrides_layer(tmp_path):
    cfg = tmp_path / "mine.toml"
    cfg.write_text('target = "rtx-3090"\nquant = "bfloat16"\nmax_batch_size = 3\n')
    r = load_recipe(get_target("rtx-3090"), cfg, ["max_batch_size=5", "max_seq_len=2048", "max_input_len=1024"])
    assert (r.quant, r.max_batch_size, r.max_seq_len, r.max_input_len) == ("bfloat16", 5, 2048, 1024)
    assert r.max_num_tokens == DEFAULTS.max_num_tokens  # unspecified -> the dataclass default


def test_override_values_are_typed():
    assert parse_overrides(["quant=int4_awq", "max_seq_len=2048", "share_embedding_table=true",
                            "kv_cache_free_gpu_memory_fraction=0.5"]) == {
        "quant": "int4_awq", "max_seq_len": 2048, "share_embedding_table": True,
        "kv_cache_free_gpu_memory_fraction": 0.5}
    # an int is accepted for a float field
    r = load_recipe(get_target("h100"), overrides={"kv_cache_free_gpu_memory_fraction": 1})
    assert r.kv_cache_free_gpu_memory_fraction == 1.0


# (target, overrides, error class, substrings in the message, substring in the fix)
BAD = [
    ("jetson-orin-nano-8gb", ["quant=fp8"], RecipeError,
     ["--set quant=fp8", "--target jetson-orin-nano-8gb cannot run FP8 (SM 8.7)", "SM >= 8.9"], "--set quant=int4_awq"),
    ("b200", ["quant=int4_awq"], RecipeError, ["cannot run INT4-AWQ (SM 10.0)", "INT8/INT4"], "--set quant=fp8"),
    ("jetson-thor", ["quant=int8_wo", "gemm_plugin=auto"], RecipeError, ["cannot run INT8 weight-only (SM 11.0)"],
     "--set quant=fp8"),
    ("rtx-3090", ["kv_cache_dtype=fp8"], RecipeError, ["cannot run fp8 KV cache (SM 8.6)"], "kv_cache_dtype=auto"),
    ("t4", ["dtype=bfloat16"], RecipeError, ["cannot run bf16 (SM 7.5)", "fp16 only"], "dtype=float16"),
    ("h100", ["max_seq_len=8192"], RecipeError, ["max_seq_len = 8192", "limit of 4096"], "max_seq_len=4096"),
    ("h100", ["max_input_len=4000", "max_seq_len=2048"], RecipeError, ["max_input_len = 4000", "max_seq_len = 2048"],
     "max_input_len="),
    ("h100", ["max_num_tokens=1024"], RecipeError, ["max_input_len = 3072", "max_num_tokens = 1024",
                                                     "--set max_num_tokens=1024"], "max_num_tokens=3072"),
    ("rtx-3090", ["group_size=96"], ConfigError, ["group_size = 96", "64, 128"], "group_size="),
    ("h100", ["gemm_plugin=auto"], RecipeError, ["gemm_plugin = 'auto' with FP8"], "gemm_plugin=disable"),
    ("jetson-orin-nano-8gb", ["kv_cache_max_tokens=0"], RecipeError, ["no cap", "starves the host"],
     "kv_cache_max_tokens=4096"),
    ("jetson-orin-nano-8gb", ["kv_cache_max_tokens=1000"], RecipeError, ["cannot hold one max_seq_len = 4096"],
     "kv_cache_max_tokens=4096"),
    ("h100", ["kv_cache_free_gpu_memory_fraction=1.5"], ConfigError, ["must be in (0, 1]"], "fraction="),
    ("h100", ["max_batch_size=0"], ConfigError, ["max_batch_size = 0 must be >= 1"], "max_batch_size="),
    ("h100", ["quant=int3"], ConfigError, ["quant = 'int3' is not one of"], "--set quant="),
    ("h100", ["quant_algo=fp8"], ConfigError, ["unknown recipe field 'quant_algo'"], "did you mean 'quant'"),
    ("h100", ['max_batch_size="8"'], ConfigError, ["field 'max_batch_size' must be int", "'8'"], "type int"),
    ("h100", ["share_embedding_table=1"], ConfigError, ["must be bool"], "type bool"),
    ("h100", ["max_seq_len"], ConfigError, ["is not key=value"], "--set max_seq_len=2048"),
]


@pytest.mark.parametrize("target,overrides,cls,parts,fix", BAD, ids=[f"{b[0]}:{b[1][0]}" for b in BAD])
def test_bad_overrides(target, overrides, cls, parts, fix):
    with pytest.raises(cls) as e:
        load_recipe(get_target(target), overrides=overrides)
    assert type(e.value) is cls
    for part in parts:
        assert part in e.value.message, e.value.message
    assert fix in (e.value.fix or ""), e.value.fix


def test_bad_file_names_the_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('target = "h100"\nquant = "fp8"\ngemm_plugin = "disable"\nkv_cache_dtype = "fp8"\nmax_seq_len = 9000\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(get_target("h100"), cfg)
    assert str(cfg) in e.value.message and "max_seq_len = 9000" in e.value.message

    cfg.write_text('quant = "bfloat16"\nmax_batch = 4\n')
    with pytest.raises(ConfigError) as e:
        load_recipe(get_target("h100"), cfg)
    assert str(cfg) in e.value.message and "'max_batch'" in e.value.message and "max_batch_size" in e.value.fix

    cfg.write_text('target = "l4"\n')
    with pytest.raises(RecipeError, match="target = 'l4' but the recipe is loaded for 'h100'"):
        load_recipe(get_target("h100"), cfg)

    cfg.write_text("quant = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_recipe(get_target("h100"), cfg)

    with pytest.raises(InputError, match="not found"):
        load_recipe(get_target("h100"), tmp_path / "missing.toml")

    with pytest.raises(InputError, match=f"{tmp_path} is not a regular file"):  # a directory
        load_recipe(get_target("h100"), tmp_path)


def test_unknown_target():
    with pytest.raises(InputError, match="unknown target 'h800'"):
        load_recipe(get_target("h800"))


def test_wrong_type_fix_quotes_this_targets_recipe_value():
    """`--set max_batch_size=abc` on the Orin Nano: the value to fall back to is the recipe's 2, not the dataclass 8."""
    from trt_gemma.recipes import _read_toml, default

    recipe_value = _read_toml(config_path("jetson-orin-nano-8gb"))["max_batch_size"]
    assert recipe_value != default("max_batch_size")
    with pytest.raises(ConfigError) as e:
        load_recipe(get_target("jetson-orin-nano-8gb"), overrides=["max_batch_size=abc"])
    assert e.value.fix.endswith(f"(jetson-orin-nano-8gb recipe: {recipe_value})"), e.value.fix


def test_max_input_len_follows_a_shorter_max_seq_len_then_the_model_clamp():
    """README tour: `--set max_seq_len=2048` alone once failed (max_input_len 3072 > 2048). The recipe's prompt share is
    kept (3072/4096), and a model with fewer positions (the embedded one: 512) clamps the already-shortened values."""
    from trt_gemma.recipes import resolve_recipe

    r, over, notes = resolve_recipe(get_target("rtx-3090"), None, ["max_seq_len=2048"])
    assert (r.max_seq_len, r.max_input_len) == (2048, 1536) and over["max_input_len"] == 1536 and len(notes) == 1
    r, _, notes = resolve_recipe(get_target("rtx-3090"), None, ["max_seq_len=2048"], max_positions=512)
    assert (r.max_seq_len, r.max_input_len) == (512, 384) and len(notes) == 2, notes
    with pytest.raises(RecipeError, match="max_input_len = 3000 is larger than max_seq_len = 2048"):
        # both set: the user decides
        load_recipe(get_target("rtx-3090"), overrides=["max_seq_len=2048", "max_input_len=3000"])
