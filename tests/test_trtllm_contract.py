"""What a TensorRT-LLM host does with our checkpoints and arguments, pinned as read from TensorRT-LLM's source.

TensorRT-LLM cannot be installed or run here, so each test copies the few lines of upstream logic that decide the
outcome (frozen below, with the file and commit they come from; docs/tensorrt-llm-contract.md explains them) and runs
our real output through them. A change on our side that breaks the contract fails here; a change upstream needs a
new read of the cited file.
"""
from __future__ import annotations

import json
import shutil
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pytest

from trt_gemma.runtime.base import GenerationParams
from trt_gemma.runtime.trtllm import attention_windows, runner_kwargs, sampling_kwargs
from trt_gemma.checkpoint.config import ModelConfig, preset_config
from trt_gemma.checkpoint.convert import convert_checkpoint, trtllm_config
from trt_gemma.errors import ConfigError
from trt_gemma.targets import get_target

# --- defect 1: weight-only checkpoints and exclude_modules -----------------------------------------------------------

# NVIDIA/TensorRT-LLM tensorrt_llm/quantization/quantize.py@06148676 `quantize_layers`:
#   exclude_modules = quant_config.exclude_modules or ['*lm_head', '*router', '*vocab_embedding', ...]
UPSTREAM_DEFAULT_EXCLUDES = ["*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                             "*shared_expert_gate", "*fused_a"]
# same file, `weight_only_quantize`: quant_map = {ColumnLinear: ..., RowLinear: ...,
#                                                Embedding: WeightOnlyQuantEmbedding}
# tensorrt_llm/quantization/layers.py@2340c776: WeightOnlyQuantEmbedding has a `per_token_scale` Parameter that
# from_checkpoint must find in the rank file ("Required but not provided tensors" otherwise).
EMBEDDINGS = ("transformer.vocab_embedding",)


def _trtllm_quantized_modules(quantization: dict, modules: list[str]) -> list[str]:
    patterns = quantization.get("exclude_modules") or UPSTREAM_DEFAULT_EXCLUDES
    return [m for m in modules if not any(fnmatchcase(m, p) for p in patterns)]


def _gemma_modules(n_layers: int) -> list[str]:
    """Module names of TensorRT-LLM's GemmaForCausalLM that a weight-only quant map can replace."""
    per_layer = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
    return ["transformer.vocab_embedding", "lm_head"] + [f"transformer.layers.{n}.{m}" for n in range(n_layers)
                                                         for m in per_layer]


def _missing_for_load(ckpt: Path) -> list[str]:
    cfg = json.loads((ckpt / "config.json").read_text())
    from trt_gemma.checkpoint.st_io import read_header

    names, _ = read_header(ckpt / "rank0.safetensors")
    quantized = _trtllm_quantized_modules(cfg["quantization"], _gemma_modules(cfg["num_hidden_layers"]))
    return [f"{m}.per_token_scale" for m in quantized if m in EMBEDDINGS and f"{m}.per_token_scale" not in names]


@pytest.mark.parametrize("wo", ["int8", "int4"])
def test_weight_only_checkpoint_loads_with_trtllm_exclusion_rules(tiny_model_dir, tmp_path, wo):
    from trt_gemma.build import share_embedding_table

    ckpt = convert_checkpoint(tiny_model_dir, tmp_path / wo, weight_only=wo, show_progress=False)
    assert _missing_for_load(ckpt) == [], "TensorRT-LLM would quantize the embedding and find no per_token_scale"
    modules = _gemma_modules(3)
    quantized = _trtllm_quantized_modules(json.loads((ckpt / "config.json").read_text())["quantization"], modules)
    assert "lm_head" not in quantized and len(quantized) == 3 * 5, quantized  # every decoder linear, nothing else
    # the shared-embedding path (recipes with share_embedding_table, build.share_embedding_table) keeps that true
    shared = tmp_path / "shared"
    shutil.copytree(ckpt, shared)
    share_embedding_table(shared)
    assert _missing_for_load(shared) == []
    assert json.loads((shared / "config.json").read_text())["quantization"]["exclude_modules"] is None


def test_reference_runtime_applies_the_same_defaults():
    """A null exclude list means TensorRT-LLM's defaults for the numpy reference too: lm_head stays float."""
    from trt_gemma.reference.checkpoint import CheckpointConfig, is_excluded

    cfg = CheckpointConfig.__new__(CheckpointConfig)
    object.__setattr__(cfg, "exclude_modules", ())
    assert is_excluded("lm_head", cfg) and is_excluded("transformer.vocab_embedding", cfg)
    assert not is_excluded("transformer.layers.0.mlp.fc", cfg)


# --- defect 3: INT4-AWQ at tensor-parallel sizes TensorRT-LLM pads ---------------------------------------------------

def _upstream_padded(out_features: int, in_features: int, group: int, tp: int) -> bool:
    """layers.py@2340c776 WeightOnlyGroupwiseQuant{,Row}Linear.__init__ (W4A16): multiple = max(64, group) * tp;
    padded when the full in or out features are not a multiple (quantize_layers passes full, unsplit sizes)."""
    multiple = max(64, group) * tp
    return bool(in_features % multiple or out_features % multiple)


def _awq_tp_ok(cfg: ModelConfig, group: int, tp: int) -> bool:
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    shapes = [(q + 2 * kv, h), (h, q), (f, h), (f, h), (h, f)]
    divisible = all(d % tp == 0 for d in (cfg.num_attention_heads, cfg.num_key_value_heads, f, cfg.vocab_size))
    return divisible and not any(_upstream_padded(o, i, group, tp) for o, i in shapes)


@pytest.mark.parametrize("model", ["gemma-2-2b", "gemma-2-9b", "gemma-2-27b"])
def test_plan_names_the_awq_tp_sizes_trtllm_loads(model):
    from trt_gemma.plan import plan

    p = plan(model, get_target("h100"),
             overrides={"quant": "int4_awq", "kv_cache_dtype": "auto", "gemm_plugin": "auto"})
    want = [tp for tp in (1, 2, 4, 8) if _awq_tp_ok(preset_config(model), 128, tp)]
    assert p.awq_tp_sizes == want
    # the cases the issue found by hand: 2b at tp 4 (2304 % 512), 9b and 27b at tp 8
    bad = {"gemma-2-2b": 4, "gemma-2-9b": 8, "gemma-2-27b": 8}[model]
    assert bad not in want and any("INT4-AWQ g128" in n and "padded" in n for n in p.notes), p.notes


def _fake_modelopt_awq(src: Path, dst: Path, group: int) -> Path:
    """ModelOpt's unified-HF INT4-AWQ layout (docs/quantization.md) with random codes: uint8 [out/2, in] weights and
    [out, in/group] scales per linear. Only shapes matter for what is tested here."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors, rng = load_file(src / "model.safetensors"), np.random.default_rng(0)
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        out, inp = tensors.pop(name).shape
        module = name[: -len(".weight")]
        tensors[f"{module}.weight"] = rng.integers(0, 256, size=(out // 2, inp), dtype=np.uint8)
        tensors[f"{module}.weight_scale"] = np.full((out, inp // group), 0.01, np.float32)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "hf_quant_config.json").write_text(json.dumps({"quantization": {
        "quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}))
    return dst


def test_convert_refuses_awq_tp_that_trtllm_pads_and_agrees_with_plan(tmp_path):
    """hidden 192 with group 64: every per-rank split divides at tp 2, but TensorRT-LLM pads 192 to 256 there."""
    from tiny import make_tiny_hf_model

    from trt_gemma.plan import plan

    src = _fake_modelopt_awq(make_tiny_hf_model(tmp_path / "hf", hidden_size=192), tmp_path / "awq", 64)
    p = plan(src, get_target("h100"), overrides={"quant": "int4_awq", "group_size": 64, "kv_cache_dtype": "auto",
                                     "gemm_plugin": "auto"})
    cfg = ModelConfig.from_file(src / "config.json")
    assert p.awq_tp_sizes == [tp for tp in (1, 2, 4, 8) if _awq_tp_ok(cfg, 64, tp)] == [1]
    for tp in (1, 2, 4, 8):
        out = tmp_path / f"tp{tp}"
        if tp in p.awq_tp_sizes:
            convert_checkpoint(src, out, dtype="bfloat16", tp=tp, show_progress=False)
            continue
        with pytest.raises(ConfigError) as e:
            convert_checkpoint(src, out, dtype="bfloat16", tp=tp, show_progress=False)
        assert "use --tp in [1]" in e.value.fix and not out.exists()
    with pytest.raises(ConfigError, match="pads INT4-AWQ"):
        convert_checkpoint(src, tmp_path / "again", dtype="bfloat16", tp=2, show_progress=False)


# --- defect 4: sampling arguments -------------------------------------------------------------------------------------

def test_sampling_sends_top_p_whenever_sampling():
    """With top_k 0 and top_p unset the executor decodes greedily (model_runner_cpp.py passes None through to
    SamplingConfig): temperature must come with a float top_p, 1.0 included."""
    kw = sampling_kwargs(GenerationParams(max_tokens=4, temperature=0.7, top_p=1.0, top_k=0, seed=3))
    assert kw == {"top_k": 0, "top_p": 1.0, "temperature": 0.7, "random_seed": 3}
    assert isinstance(kw["top_p"], float)
    assert sampling_kwargs(GenerationParams(max_tokens=4, temperature=1.0, top_p=0.9, top_k=40))["top_p"] == 0.9
    greedy = sampling_kwargs(GenerationParams(max_tokens=4, temperature=0.0, top_p=0.5))
    assert greedy["top_k"] == 1 and greedy["top_p"] is None


# --- defect 5: the sliding window reaches the runtime -----------------------------------------------------------------

def _engine_config(pretrained: dict, max_seq_len: int) -> dict:
    # TensorRT-LLM's engine config.json = {"version", "pretrained_config", "build_config"}; PretrainedConfig keeps
    # unknown checkpoint keys as attributes and to_dict() copies __dict__ (models/modeling_utils.py), so our
    # `trt_gemma` block travels into pretrained_config.
    return {"version": "1.2", "pretrained_config": pretrained,
            "build_config": {"max_batch_size": 4, "max_input_len": max_seq_len // 2, "max_seq_len": max_seq_len}}


def test_per_layer_attention_window_from_layer_types(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers reads the HF config independently")
    from trt_gemma.assets import default_model_dir

    model_dir = default_model_dir()
    hf = transformers.AutoConfig.from_pretrained(model_dir)
    pretrained = trtllm_config(ModelConfig.from_file(model_dir / "config.json"), "bfloat16", 1, None)
    kw = runner_kwargs(tmp_path, _engine_config(pretrained, 512), slots=2)
    want = [hf.sliding_window if t == "sliding_attention" else 512 for t in hf.layer_types]
    assert hf.sliding_window == 128 and kw["max_attention_window_size"] == want
    assert kw["max_batch_size"] == 2 and kw["engine_dir"] == str(tmp_path)
    # real Gemma 2 (window 4096) at max_seq_len <= 4096: no argument, TensorRT-LLM's default is already right
    real = trtllm_config(preset_config("gemma-2-2b"), "bfloat16", 1, None)
    assert "max_attention_window_size" not in runner_kwargs(tmp_path, _engine_config(real, 4096))
    assert attention_windows(real, 4096) is None


def test_attention_window_from_the_bundle_checkpoint_when_the_engine_config_lacks_it(tmp_path):
    """If TensorRT-LLM did not carry our block into the engine config, BUNDLE/checkpoint/config.json still has it."""
    from trt_gemma.assets import default_model_dir

    pretrained = trtllm_config(ModelConfig.from_file(default_model_dir() / "config.json"), "bfloat16", 1, None)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps(pretrained))
    engine_cfg = _engine_config({k: v for k, v in pretrained.items() if k != "trt_gemma"}, 512)
    kw = runner_kwargs(tmp_path / "engine", engine_cfg)
    assert kw["max_attention_window_size"] == runner_kwargs(tmp_path / "x", _engine_config(pretrained, 512))[
        "max_attention_window_size"] == [128, 512, 128, 512]
