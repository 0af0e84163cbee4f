"""The `quantization` block of a TensorRT-LLM checkpoint's config.json, written in this one place.

TensorRT-LLM reads it into its `QuantConfig` and picks the layers to quantize in `quantize_layers`
(NVIDIA/TensorRT-LLM tensorrt_llm/quantization/quantize.py@06148676): `exclude_modules or <defaults>`, matched with
`fnmatch.fnmatchcase` against module names. Only the defaults exclude `*vocab_embedding`. For the weight-only
algorithms (W8A16 / W4A16) the quant map includes `Embedding -> WeightOnlyQuantEmbedding`, so an explicit list such as
["lm_head"] makes the embedding a quantized layer that needs `transformer.vocab_embedding.per_token_scale`, a tensor
no float checkpoint has: loading fails. TensorRT-LLM's own Gemma converter leaves `exclude_modules` null for weight-only
(examples/models/core/gemma/convert_checkpoint.py@fbbc05dd `create_quant_config`), and so do we. INT4-AWQ and FP8 keep
ModelOpt's ["lm_head"]: their quant maps have no Embedding entry. docs/tensorrt-llm-contract.md has the details.
"""
from __future__ import annotations

# quantize_layers' defaults when exclude_modules is None or empty (quantize.py@06148676)
TRTLLM_DEFAULT_EXCLUDES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                           "*shared_expert_gate", "*fused_a")
WEIGHT_ONLY_ALGOS = frozenset({"W8A16", "W4A16"})  # weight_only_quantize: Column/RowLinear and Embedding


def exclude_modules(quant_algo: str | None) -> list[str] | None:
    """What we write: null (TensorRT-LLM's defaults) for float and weight-only, ["lm_head"] for AWQ / FP8."""
    if quant_algo is None or quant_algo in WEIGHT_ONLY_ALGOS:
        return None
    return ["lm_head"]  # quantizing Gemma's lm_head gave bad outputs (NVIDIA/TensorRT-LLM #1394)


def quantization_block(quant_algo: str | None, kv_cache_quant_algo: str | None = None, group_size: int = 128,
                       pre_quant_scale: bool = False) -> dict:
    """config.json `quantization`: TensorRT-LLM's QuantConfig fields."""
    return {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache_quant_algo, "group_size": group_size,
            "has_zero_point": False, "pre_quant_scale": pre_quant_scale,
            "exclude_modules": exclude_modules(quant_algo), "smoothquant_val": 0.5, "clamp_val": None,
            "use_meta_recipe": False}


def with_shared_embedding(block: dict) -> dict:
    """The block for a checkpoint whose lm_head reuses the embedding table: ModelOpt's export appends "lm_head" to
    an explicit exclude list; a null list already excludes `*lm_head` (and must stay null, see above)."""
    out = dict(block)
    if out.get("quant_algo") and out.get("exclude_modules"):
        out["exclude_modules"] = sorted(set(out["exclude_modules"]) | {"lm_head"})
    return out


def effective_excludes(patterns) -> tuple[str, ...]:
    """The patterns TensorRT-LLM applies for a written `exclude_modules` (null or empty -> its defaults)."""
    return tuple(patterns or TRTLLM_DEFAULT_EXCLUDES)
