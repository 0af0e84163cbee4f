"""Memory and decode roofline of the TensorRT route (ONNX graph -> TensorRT engine), for `trt-gemma plan`.

What the engine holds, by class [INF: derived from the graph's shape, not measured on a device]:
- weights: the bundle checkpoint's, as trt_gemma.plan.weight_bytes counts them (the ONNX graph carries the same
  tensors: INT4 blocks + fp16 scales + AWQ pre-scales, fp16 embedding and lm_head);
- KV cache: the route exports the pool layout (trt_gemma/onnx/pool.py): one pool of max_batch_size slots x max_seq_len
  positions that the runtime owns and binds whole, plus the graph's new-rows output (the K/V of the step's new tokens,
  at most the prefill profile's batch x max_input_len), which the runtime copies into the pool;
- activations per optimization profile: the MLP (gate, up, product) and residual stream for every token of the
  profile, the attention scores [batch, heads, new, total] that a standard-operator graph materialises, and the
  float32 logits [batch, 1, vocab] of the last position (the route exports with logits="last": the final norm and
  the lm_head run on one row per prompt; an all-positions graph would return ~1 GB per 1024-token prompt on a 256k
  vocabulary), and one layer's past K/V gathered from the pool and joined with the new rows (two copies);
- KV and activations are counted in the recipe's dtype: the route exports its graph with the recipe's dtype as
  activations (engine/build.tensorrt_route -> export_onnx(activations=recipe.dtype)); a graph exported by hand with
  float32 activations would double both, and the plan says so;
- runtime overhead: trt_gemma.plan.OVERHEAD for the target family plus a workspace.
TensorRT sizes an execution context for the largest profile it may run, so the plan takes the larger profile.

Decode roofline (batch 1): tok/s <= bandwidth / (bytes read per token + context x KV bytes per token), with the
lm_head in the activation dtype, INT8 per channel, or INT4 in blocks of 128 along the input dimension (what the export
writes; the recipe's `lm_head_quant` picks one for the engine). On Gemma
2 2B INT4-AWQ the fp16 lm_head is 1.18 GB of the 2.22 GB read per token: the largest single decode-speed lever.
"""
from __future__ import annotations

from trt_gemma.quant.formats import FLOAT_BYTES, FORMATS

LM_HEAD_FORMATS = {"int8": "int8_wo", "int4": "int4_awq"}  # lm_head variant -> the weight format that sizes it
LM_HEAD_GROUP = 128  # the export's int4 head block (trt_gemma.onnx.weights.LM_HEAD_GROUP), whatever the recipe's group
LOGITS_BYTES = 4  # the exported graph returns float32 logits (trt_gemma.onnx.export)
LOGITS_ROWS = 1  # per sequence: the route's graph returns the last position only (export_onnx logits="last")


def lm_head_bytes(cfg, recipe, variant: str) -> int:
    """The lm_head matrix [vocab, hidden] in the activation dtype ("float") or a quantized variant."""
    if variant == "float":
        return cfg.vocab_size * cfg.hidden_size * FLOAT_BYTES[recipe.dtype]
    return FORMATS[LM_HEAD_FORMATS[variant]].engine_bytes(cfg.vocab_size, cfg.hidden_size, LM_HEAD_GROUP)


def profile_activations(cfg, recipe, act_dtype: str | None = None) -> dict[str, dict[str, int]]:
    """Activation bytes per profile (prefill: its prompts of max_input_len tokens; decode: max_batch_size tokens)
    by class [INF], in `act_dtype` (the route's, `engine_activations`; default the recipe's)."""
    from trt_gemma.engine.profiles import Limits

    act = FLOAT_BYTES[act_dtype or recipe.dtype]
    limits = Limits.from_recipe(recipe)
    n, s = recipe.max_input_len, recipe.max_seq_len
    out = {}
    for name, b, new in (("prefill", limits.prefill_batch, n), ("decode", recipe.max_batch_size, 1)):
        tokens = b * new
        out[name] = {"mlp_and_residual": tokens * (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * act,
                     "attention_scores": b * cfg.num_attention_heads * new * s * act,
                     "gathered_kv": 2 * b * s * 2 * cfg.num_key_value_heads * cfg.head_dim * act,
                     "logits": b * LOGITS_ROWS * cfg.vocab_size * LOGITS_BYTES}
        out[name]["total"] = sum(out[name].values())
    return out


def tensorrt_plan(cfg, target, recipe, *, weights: dict, kv_tok: int, overhead: dict) -> dict:
    """Memory by class against the target, the decode roofline with and without lm_head quantized, and the engine
    build's own peak memory (`build`). plan.py passes its own weight bytes, KV bytes per token and runtime overhead
    (this module sits below it) and judges the total with its one fit rule when the recipe builds this route."""
    from trt_gemma.engine.rules import route

    selected = {"none": "float"}.get(recipe.lm_head_quant, recipe.lm_head_quant)
    # the route's graph holds the embedding and, with lm_head_quant, a quantized head beside it (no float copy)
    w = dict(weights)
    if selected != "float":
        w["total"] = weights["total"] - weights["lm_head"] + lm_head_bytes(cfg, recipe, selected)
    act_dtype = engine_activations(recipe.dtype, target.sm)
    table = cfg.vocab_size * cfg.hidden_size * FLOAT_BYTES[act_dtype]
    build = build_plan(w["total"], table, act_dtype, target, on_device=not route(target)[0].targets_sm)
    from trt_gemma.engine.profiles import Limits

    new_rows = max(Limits.from_recipe(recipe).prefill_batch * recipe.max_input_len, recipe.max_batch_size)
    kv = (recipe.max_batch_size * recipe.max_seq_len + new_rows) * kv_tok
    acts = profile_activations(cfg, recipe, act_dtype)
    act_peak = max(p["total"] for p in acts.values())
    total = w["total"] + kv + act_peak + sum(overhead.values())
    usable = target.usable_bytes
    body = w["linears"] + w["norms"] + cfg.hidden_size * FLOAT_BYTES[recipe.dtype]  # + one embedding row
    roofline = {}
    for variant in ("float", "int8", "int4"):
        head = lm_head_bytes(cfg, recipe, variant)
        read = body + head
        roofline[variant] = {"lm_head_bytes": head, "read_bytes_per_token": read,
                             "tok_s_context_0": round(target.bandwidth_gbs * 1e9 / read, 1),
                             f"tok_s_context_{recipe.max_seq_len}":
                                 round(target.bandwidth_gbs * 1e9 / (read + recipe.max_seq_len * kv_tok), 1)}
    assumes = (f"KV and activations in {act_dtype}, as the route exports the graph; float32 logits of the last "
               "position; a float32-activation export would double KV and activations")
    return {"weights_bytes": w["total"], "kv_bytes": kv, "kv_note": "the pool: max_batch_size x max_seq_len, + one step's new rows",
            "assumes": assumes,
            "activations": acts, "activation_peak_bytes": act_peak, "overhead": overhead, "total_bytes": total,
            "usable_bytes": usable, "lm_head": selected, "lm_head_roofline": roofline,
            "activation_dtype": act_dtype, "build": build}


def render_lines(t: dict, dtype: str) -> list[str]:
    """Plain lines for `trt-gemma plan` (GiB for memory, GB per token for reads)."""
    g = 1024**3
    acts = ", ".join(f"{k} {v['total'] / g:.2f} GiB (logits {v['logits'] / g:.2f})" for k, v in t["activations"].items())
    lines = [f"TensorRT route: weights {t['weights_bytes'] / g:.2f} GiB + KV {t['kv_bytes'] / g:.2f} GiB "
             f"({t['kv_note']}) + activations {t['activation_peak_bytes'] / g:.2f} GiB (per profile: {acts}) + runtime "
             f"{sum(t['overhead'].values()) / g:.2f} GiB = {t['total_bytes'] / g:.2f} of {t['usable_bytes'] / g:.2f} "
             f"GiB (assumes {t['assumes']})"]
    names = {"float": f"{dtype} lm_head", "int8": "INT8 lm_head", "int4": "INT4 lm_head"}
    parts = []
    for variant, r in t["lm_head_roofline"].items():
        ctx = [k for k in r if k.startswith("tok_s_context_") and k != "tok_s_context_0"][0]
        mark = " [recipe]" if variant == t.get("lm_head") else ""  # the recipe's lm_head_quant
        parts.append(f"{names[variant]} ({r['lm_head_bytes'] / 1e9:.2f} of {r['read_bytes_per_token'] / 1e9:.2f} GB "
                     f"read/token){mark}: {r['tok_s_context_0']:g} tok/s ({r[ctx]:g} at {ctx.rsplit('_', 1)[1]})")
    lines.append("decode roofline, batch 1, by lm_head: " + "; ".join(parts))
    b = t.get("build")
    if b:
        where = (f"on the device: {b['peak_bytes'] / g:.2f} of {b['usable_bytes'] / g:.2f} GiB, {b['verdict']}"
                 if b["usable_bytes"] else f"{b['peak_bytes'] / g:.2f} GiB of host RAM where it is built")
        lines.append(f"engine build peak memory (predicted): {where}")
        lines += [f"  remedy: {r}" for r in b["remedies"]]
    return lines



# --- the engine build's own memory ---------------------------------------------------------------------------------
# Peak RSS of the TensorRT builder (parse + build + serialize) against the bytes of the graph's weights, measured
# with the real tensorrt-rtx 1.7 builder (CPU host, SM 8.9) on synthetic Gemma-2-2B-shaped INT4-AWQ graphs with
# float16 activations and an int4 lm_head (benchmarks/build_memory.py; docs/engines.md has the table):
#   0.27 GB of weights -> 1.02 GB peak; 1.08 GB -> 3.17 GB; 2.42 GB -> 8.2 GB (the full 2B shape).
# A line through the origin's side of all three: peak <= 3.4 x weights + 0.3 GB (over by 4-26%, never under).
# float32 activations fold the bf16 embedding into an fp32 constant: the 2B build went from 8.2 to 9.7 GB, ~1.3x the
# table's fp16 bytes more.
BUILD_PER_WEIGHT_BYTE = 3.4
BUILD_FIXED = 300 * 10**6
BUILD_FP32_TABLE = 1.3
BUILD_REMEDIES = (
    ("swap", "add swap on NVMe (sudo jetson/setup.sh --swap-dir /mnt/nvme --swap-gb 16): the builder's host "
             "memory pages out; CUDA allocations stay resident"),
    ("headless", "stop the desktop and other processes first (jetson/setup.sh --headless)"),
    ("workspace", "cap the tactic workspace: IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes) "
                  "(TensorRT >= 8.4; JetPack 6 has 10.3)"),
    ("optimization_level", "build at a lower IBuilderConfig.builder_optimization_level (TensorRT >= 8.6; default 3): "
                           "fewer tactics timed, less scratch"),
    ("float16", "export with float16 activations (the route does unless the recipe's dtype is bfloat16): float32 "
                "folds the embedding into an fp32 constant"),
)


def engine_activations(dtype: str, sm: int) -> str:
    """The activation dtype the TensorRT route exports: the recipe's, except float32, which becomes float16 where the
    GPU has fp16 (every TensorRT target: SM >= 5.3) -- a float32 graph makes an engine larger than its weights (the
    bf16 embedding folded to fp32: 3.47 GB from 2.42 GB on the 2B shape, against 2.55 GB in float16)."""
    return "float16" if dtype == "float32" and sm >= 53 else dtype


def build_memory(weights_bytes: int, activations: str, table_bytes: int = 0) -> dict:
    """Predicted peak host memory of building an engine from a graph holding `weights_bytes` (`table_bytes`: its
    float embedding, which a float32 graph doubles)."""
    extra = int(BUILD_FP32_TABLE * table_bytes) if activations == "float32" else 0
    return {"peak_bytes": int(BUILD_PER_WEIGHT_BYTE * weights_bytes) + BUILD_FIXED + extra,
            "basis": "tensorrt-rtx 1.7 builder measured on 0.27 / 1.08 / 2.42 GB INT4 graphs (docs/engines.md)"}


def build_plan(weights_bytes: int, table_bytes: int, activations: str, target, on_device: bool) -> dict:
    """The on-device build's peak against the module's memory, and what to do where it does not fit. A builder that
    targets an SM from any host (TensorRT-RTX) builds off the device, so only the host RAM it needs is reported."""
    m = build_memory(weights_bytes, activations, table_bytes)
    judged = on_device and target.unified  # a dGPU host's RAM is not the card's memory: no verdict there
    out = {**m, "on_device": on_device, "usable_bytes": target.usable_bytes if judged else None,
           "verdict": None, "remedies": []}
    if judged:
        out["verdict"] = "fits" if m["peak_bytes"] <= target.usable_bytes else "exceeds memory"
        if out["verdict"] != "fits":
            out["remedies"] = [text for key, text in BUILD_REMEDIES
                               if key != "float16" or activations == "float32"]
    return out
