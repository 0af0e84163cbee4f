"""Will a Gemma 2 model fit a target? Memory by class, a verdict, the largest settings that fit, a decode roofline.

Memory model (docs/facts/targets.md §5-6, docs/tensorrt-llm-contract.md §4-5; [INF] = an estimate made here):
- weights as the engine holds them: embedding (model dtype, never quantized), lm_head (tied in HF but a separate
  tensor in the TRT-LLM checkpoint/engine, excluded from quantization) unless the recipe shares the embedding table,
  per-layer linears with their scales from `trt_gemma.quant.formats.FORMATS`, norms in model dtype;
- KV cache: 2 x layers x kv_heads x head_dim x bytes per token, for max_batch_size x max_seq_len tokens (TRT-LLM treats
  every Gemma 2 layer as global, so the sliding window saves nothing there);
- activations [INF]: per token of max_num_tokens the fused gate/fc output, the GeLU product and the residual stream
  ((3 x intermediate + 2 x hidden) x activation bytes), plus float32 generation logits per sequence and a fixed workspace;
- runtime overhead [INF]: CUDA context + TensorRT/TRT-LLM kernels; on Jetson also an OS reserve, because the GPU
  shares MemTotal with the (headless) OS; on RTX cards the display takes some VRAM.
Decode roofline at batch 1: tok/s <= bandwidth / (non-embedding weights + lm_head + context x KV per token).
That is TensorRT-LLM's engine. A recipe with engine = "tensorrt" builds the TensorRT route instead, whose memory
trt_gemma.engine.plan counts; the plan gives one verdict, its largest fits and its suggestion on the route the recipe
builds, and the other route's total only as a labelled figure (`route_totals`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from trt_gemma.checkpoint.config import PRESETS, ModelConfig, preset_config
from trt_gemma.errors import FitError, InputError, TrtGemmaError
from trt_gemma.quant.formats import FLOAT_BYTES, FORMATS, KV_BYTES
from trt_gemma.recipes import GEMMA2_MAX_SEQ_LEN, GROUP_SIZES, Recipe, resolve_recipe, validate
from trt_gemma.targets import GiB, MiB, Target, support_level, supports
from trt_gemma.checkpoint.tensor_map import TP_CANDIDATES, awq_tp_sizes, linear_shapes, parameter_count

MARGIN = 0.10  # "fits" keeps 10% of usable memory free; "tight" fits without that margin

# Runtime overhead per family, bytes [INF]. Jetson: CUDA context + TRT libraries with CUDA lazy loading, and a headless
# JetPack OS reserve (the desktop takes ~0.25-0.8 GB more, docs/facts/jetson.md §5: jetson/setup.sh disables it).
OVERHEAD = {
    "jetson": {"cuda_context": 512 * MiB, "os_reserve": 512 * MiB},
    "rtx": {"cuda_context": 1 * GiB, "display_reserve": 512 * MiB},
    "datacenter": {"cuda_context": 1 * GiB},
}
WORKSPACE = 128 * MiB  # TRT/plugin workspaces [INF]

# Published parameter counts (the paper pads the vocabulary to 256,128; HF tensors use 256,000).
PUBLISHED_PARAMETERS = {
    "gemma-2-2b": (2_614_636_800, "Gemma 2 tech report, arXiv 2408.00118 Tables 1-2 (vocab 256,128)", 256_128),
}
# Weight formats from best to worst expected accuracy (the order suggestions are tried in).
QUALITY_ORDER = ("bfloat16", "float16", "fp8", "int8_wo", "int4_awq", "int4_wo")


@dataclass
class Plan:
    model: str
    target: str
    recipe: Recipe
    parameters: int
    parameters_published: int | None
    parameters_note: str
    weights: dict
    kv_bytes_per_token: int
    kv_bytes_per_token_by_dtype: dict
    kv_tokens: int
    kv_bytes: int
    activation_bytes: int
    overhead: dict
    total_bytes: int
    usable_bytes: int
    headroom_bytes: int
    verdict: str  # "fits" | "tight" | "does not fit"
    reason: str
    max_seq_len_fit: int
    max_batch_fit: int
    read_bytes_per_token: int
    decode_tok_s: dict
    suggestion: dict | None = None
    notes: list = field(default_factory=list)
    awq_tp_sizes: list | None = None  # INT4-AWQ: the tp sizes TensorRT-LLM loads our checkpoint at (convert agrees)
    tensorrt: dict | None = None  # engine = "tensorrt" recipes: trt_gemma.engine.plan.tensorrt_plan
    route: str = "tensorrt_llm"  # the route the recipe builds (its `engine`): the verdict and fits are judged on it
    route_totals: dict = field(default_factory=dict)  # bytes each planned route needs ({route: total}), labelled

    @property
    def fits(self) -> bool:
        return self.verdict != "does not fit"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        d["kv_dtype"] = self.recipe.kv_dtype
        return d


def model_config(model: str | Path) -> tuple[ModelConfig, str]:
    """A preset name (real HF values), a local HF model dir (its config.json) or an HF config.json file itself (a
    bundle's copy), a hub id (config.json from the local HF cache or the hub), or "default": the embedded model."""
    if str(model) == "default":
        from trt_gemma.assets import DEFAULT_MODEL_NAME, default_model_dir

        return ModelConfig.from_file(default_model_dir() / "config.json"), DEFAULT_MODEL_NAME
    if str(model) in PRESETS:
        return preset_config(str(model)), str(model)
    path = Path(model)
    if path.is_dir():
        return ModelConfig.from_file(path / "config.json"), str(path)
    if path.is_file() and path.suffix == ".json":
        return ModelConfig.from_file(path), str(path)
    if str(model).count("/") == 1 and not str(model).startswith((".", "~")):
        # a hub id ("org/name"), resolved like every other command does (local HF cache, HF_HUB_OFFLINE honoured);
        # planning reads config.json only, so nothing else is fetched
        from trt_gemma.checkpoint.hf import resolve_model

        return ModelConfig.from_file(resolve_model(str(model), config_only=True) / "config.json"), str(model)
    raise InputError(f"--model {model!r} is neither a preset, a local model dir nor a hub id (org/name)",
                     fix=f"use default (the embedded model), one of {', '.join(PRESETS)}, a directory "
                         "containing config.json, or a hub id such as google/gemma-2-2b-it")


def _linear_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of qkv, dense, fc, gate, proj as in the TRT-LLM checkpoint: the tensor table's (tensor_map)."""
    return list(linear_shapes(cfg).values())


def _group_misfit(cfg: ModelConfig, quant: str, group_size: int) -> int | None:
    """The first in_features that `group_size` does not divide, for the groupwise format (int4_awq); else None."""
    if quant != "int4_awq":
        return None
    return next((i for _, i in _linear_shapes(cfg) if i % group_size), None)


def weight_bytes(cfg: ModelConfig, r: Recipe) -> dict:
    fmt, act = FORMATS[r.quant], FLOAT_BYTES[r.dtype]
    bad = _group_misfit(cfg, r.quant, r.group_size)
    if bad is not None:
        ok = [g for g in GROUP_SIZES if _group_misfit(cfg, r.quant, g) is None]
        raise InputError(f"in_features {bad} is not a multiple of group_size {r.group_size}",
                         fix=f"use --set group_size={ok[0]}" if ok else "use a weight-only or float recipe")
    linears = cfg.num_hidden_layers * sum(fmt.engine_bytes(o, i, r.group_size) for o, i in _linear_shapes(cfg))
    table = cfg.vocab_size * cfg.hidden_size * act
    w = {"embedding": table, "lm_head": 0 if r.share_embedding_table else table, "linears": linears,
         "norms": (4 * cfg.num_hidden_layers + 1) * cfg.hidden_size * act}
    w["total"] = sum(w.values())
    return w


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * KV_BYTES[kv_dtype]


def activation_bytes(cfg: ModelConfig, r: Recipe) -> int:
    per_token = (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * FLOAT_BYTES[r.dtype]
    return r.max_num_tokens * per_token + r.max_batch_size * cfg.vocab_size * 4 + WORKSPACE


def _memory(cfg: ModelConfig, t: Target, r: Recipe) -> dict:
    w = weight_bytes(cfg, r)
    kv_tok = kv_bytes_per_token(cfg, r.kv_dtype)
    tokens = r.max_batch_size * r.max_seq_len
    if r.kv_cache_max_tokens:
        tokens = min(tokens, r.kv_cache_max_tokens)
    overhead = dict(OVERHEAD[t.family])
    fixed = w["total"] + activation_bytes(cfg, r) + sum(overhead.values())
    return {"weights": w, "kv_tok": kv_tok, "kv_tokens": tokens, "overhead": overhead, "fixed": fixed,
            "total": fixed + tokens * kv_tok}


def fit_verdict(total: int, usable: int) -> str:
    """fits (within the margin), tight (without it), does not fit: one rule for a model and a chat + guard pair."""
    if total <= usable * (1 - MARGIN):
        return "fits"
    return "tight" if total <= usable else "does not fit"


def _tensorrt(cfg: ModelConfig, t: Target, r: Recipe, m: dict) -> dict:
    """The TensorRT route's memory (engine/plan.py) from the same weights and KV bytes per token."""
    from trt_gemma.engine.plan import tensorrt_plan

    overhead = {**OVERHEAD[t.family], "workspace": WORKSPACE}
    return tensorrt_plan(cfg, t, r, weights=m["weights"], kv_tok=m["kv_tok"], overhead=overhead)


def route_total(cfg: ModelConfig, t: Target, r: Recipe) -> int:
    """Bytes the route the recipe builds needs: TensorRT-LLM's engine and KV pool, or the TensorRT route's engine
    (the KV pool and a step's new rows, per-profile activations: engine/plan.py)."""
    m = _memory(cfg, t, r)
    return _tensorrt(cfg, t, r, m)["total_bytes"] if r.engine == "tensorrt" else m["total"]


def fits(cfg: ModelConfig, t: Target, r: Recipe) -> bool:
    return fit_verdict(route_total(cfg, t, r), t.usable_bytes) == "fits"


MAX_BATCH_SEARCH = 1 << 20  # upper end of the largest-batch search (a bound, not a limit anyone builds)


def _largest(ok, hi: int) -> int:
    """The largest n in 1..hi with ok(n), for ok true up to a point and false beyond (memory grows with n); 0: none."""
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def largest_fits(cfg: ModelConfig, t: Target, r: Recipe) -> tuple[int, int]:
    """(the largest max_seq_len, a multiple of 128 or the model's limit, at the recipe's batch; the largest
    max_batch_size at its max_seq_len) that fit with the margin on the recipe's route. The KV pool is taken uncapped:
    the question is what the engine could hold."""
    def ok(**changes) -> bool:
        return fits(cfg, t, r.replace(kv_cache_max_tokens=0, **changes))

    def seq_ok(s: int) -> bool:
        return ok(max_seq_len=s, max_input_len=min(r.max_input_len, s))

    limit = min(GEMMA2_MAX_SEQ_LEN, cfg.max_position_embeddings)
    seq = limit if seq_ok(limit) else 128 * _largest(lambda k: seq_ok(128 * k), (limit - 1) // 128)
    return seq, _largest(lambda b: ok(max_batch_size=b), MAX_BATCH_SEARCH)


def plan(model: str | Path, t: Target, overrides=None, config_file=None, recipe: Recipe | None = None,
         recipe_notes: list | tuple = (), name: str | None = None) -> Plan:
    """Plan `model` on `target` with the target's recipe (or `config_file`) plus `overrides` (dict or key=value).
    Like `trt-gemma build`, limits beyond the model's max_position_embeddings are clamped to it (noted). A caller that
    already resolved the recipe (build) passes it as `recipe` with its notes: it is not loaded or validated again.
    `name`: the model's name in the plan when `model` is a file (a bundle's config copy)."""
    cfg, found = model_config(model)
    name = name or found
    if recipe is None:
        r, _, recipe_notes = resolve_recipe(t, config_file, overrides, cfg.max_position_embeddings)
    else:
        r = recipe
    m = _memory(cfg, t, r)
    totals = {"tensorrt_llm": m["total"]}
    trt = _tensorrt(cfg, t, r, m) if r.engine == "tensorrt" else None
    if trt is not None:
        totals["tensorrt"] = trt["total_bytes"]
    total = totals[r.engine]  # one verdict: the route the recipe builds
    verdict = fit_verdict(total, t.usable_bytes)
    kv_tok, w = m["kv_tok"], m["weights"]
    seq_fit, batch_fit = largest_fits(cfg, t, r)
    read = w["linears"] + w["norms"] + (w["lm_head"] or w["embedding"]) + cfg.hidden_size * FLOAT_BYTES[r.dtype]
    params = parameter_count(cfg)
    published, note = _published(name, cfg, params)
    p = Plan(
        model=name, target=t.name, recipe=r, parameters=params, parameters_published=published,
        parameters_note=note, weights=w, kv_bytes_per_token=kv_tok,
        kv_bytes_per_token_by_dtype={d: kv_bytes_per_token(cfg, d) for d in ("bfloat16", "float16", "fp8", "int8")},
        kv_tokens=m["kv_tokens"], kv_bytes=m["kv_tokens"] * kv_tok,
        activation_bytes=activation_bytes(cfg, r), overhead=m["overhead"], total_bytes=total,
        usable_bytes=t.usable_bytes, headroom_bytes=t.usable_bytes - total, verdict=verdict,
        reason=_reason(verdict, total, t), max_seq_len_fit=seq_fit, max_batch_fit=batch_fit,
        read_bytes_per_token=read,
        decode_tok_s={"context_0": round(t.bandwidth_gbs * 1e9 / read, 1),
                      f"context_{r.max_seq_len}": round(t.bandwidth_gbs * 1e9 / (read + r.max_seq_len * kv_tok), 1)},
        notes=list(recipe_notes) + _notes(t, r), tensorrt=trt, route=r.engine, route_totals=totals)
    if r.quant == "int4_awq":
        p.awq_tp_sizes = awq_tp_sizes(cfg, r.group_size)
        if p.awq_tp_sizes != list(TP_CANDIDATES):
            bad = [tp for tp in TP_CANDIDATES if tp not in p.awq_tp_sizes]
            p.notes.append(f"INT4-AWQ g{r.group_size}: TensorRT-LLM loads this checkpoint at tp "
                           f"{', '.join(map(str, p.awq_tp_sizes)) or 'none'} only; at tp {', '.join(map(str, bad))} "
                           "its groupwise layers need padded tensors (`trt-gemma convert --tp` refuses those)")
    if verdict == "does not fit":
        p.suggestion = suggest(cfg, t, r)
    return p


def _published(name: str, cfg: ModelConfig, params: int) -> tuple[int | None, str]:
    if name not in PUBLISHED_PARAMETERS:
        return None, "counted from the model's tensors"
    count, source, vocab = PUBLISHED_PARAMETERS[name]
    diff = count - params
    return count, (f"counted from the HF tensors (vocab {cfg.vocab_size:,}); the published {count:,} ({source}) "
                   f"includes {vocab - cfg.vocab_size} padding rows: {vocab - cfg.vocab_size} x {cfg.hidden_size} "
                   f"= {diff:,} parameters")


def _reason(verdict: str, total: int, t: Target) -> str:
    pct = 100 * total / t.usable_bytes
    what = "MemTotal shared with the OS" if t.unified else "device memory"
    if verdict == "fits":
        return f"needs {_gib(total)} of {_gib(t.usable_bytes)} {what} ({pct:.0f}%), keeping the 10% margin"
    if verdict == "tight":
        return f"needs {_gib(total)} of {_gib(t.usable_bytes)} {what} ({pct:.0f}%): fits without the 10% margin"
    return f"needs {_gib(total)} but {t.name} has {_gib(t.usable_bytes)} {what} ({pct:.0f}%)"


def _notes(t: Target, r: Recipe) -> list[str]:
    notes = []
    if r.share_embedding_table:
        notes.append("assumes the engine shares the embedding table with lm_head (checkpoint without lm_head.weight);"
                     " whether TRT-LLM keeps one copy is unconfirmed: measure the engine size")
    if t.unified:
        notes.append("unified memory: the OS reserve assumes a headless JetPack (jetson/setup.sh); a desktop "
                     "session takes 0.25-0.8 GB more")
    if t.trt_caveat:
        notes.append(t.trt_caveat)
    for precision in (r.quant, r.dtype):
        level, reason = support_level(t, precision)
        if level == "unconfirmed":
            notes.append(f"{precision} on {t.name}: {reason}")
    for field_name in sorted(t.unconfirmed):
        notes.append(f"target figure {field_name} is unconfirmed")
    return notes


SEQ_STEPS = (4096, 3072, 2048, 1536, 1024, 512, 256)  # max_seq_len values a suggestion tries, longest first


def suggest(cfg: ModelConfig, t: Target, r: Recipe) -> dict | None:
    """The smallest recipe change that fits, tried in the order a user would: a smaller batch (the largest that fits),
    a shorter max_seq_len at this batch, an FP8 KV cache, lighter weights (by expected quality), a shared embedding
    table; only then those together with smaller limits. Each candidate is validated like a user's --set."""
    for changes in _changes(t, r):
        cand = _candidate(cfg, r, t, changes)
        if cand is not None and fits(cfg, t, cand):
            diff = {k: v for k, v in cand.to_dict().items() if v != getattr(r, k)}
            return {"set": diff, "total_bytes": route_total(cfg, t, cand),
                    "command": " ".join(f"--set {k}={_plain(v)}" for k, v in diff.items())}
    return None


def _changes(t: Target, r: Recipe):
    batches = range(r.max_batch_size - 1, 0, -1)
    seqs = [s for s in SEQ_STEPS if s < r.max_seq_len]
    kvs = ["fp8"] if supports(t, "kv_fp8")[0] and r.kv_dtype != "fp8" else []
    lighter = [q for q in QUALITY_ORDER[QUALITY_ORDER.index(r.quant) + 1:] if supports(t, q)[0]] \
        if r.quant in QUALITY_ORDER else []
    shares = [] if r.share_embedding_table else [True]
    yield from ({"max_batch_size": b} for b in batches)
    yield from ({"max_seq_len": s} for s in seqs)
    yield from ({"kv_cache_dtype": kv} for kv in kvs)
    yield from ({"quant": q} for q in lighter)
    yield from ({"share_embedding_table": v} for v in shares)
    for quant in [r.quant, *lighter]:
        for kv in [r.kv_cache_dtype, *kvs]:
            for share in [r.share_embedding_table, *shares]:
                base = {"quant": quant, "kv_cache_dtype": kv, "share_embedding_table": share}
                yield from ({**base, "max_batch_size": b} for b in (r.max_batch_size, *batches))
                yield from ({**base, "max_batch_size": 1, "max_seq_len": s} for s in seqs)


def _candidate(cfg: ModelConfig, r: Recipe, t: Target, changes: dict) -> Recipe | None:
    """`r` with `changes` plus the fields that must follow them (prompt length within the sequence, the GEMM plugin
    rule for FP8, a token cap that still holds the batch); None when the result would not validate."""
    c = dict(changes)
    quant, batch, seq = c.get("quant", r.quant), c.get("max_batch_size", r.max_batch_size), \
        c.get("max_seq_len", r.max_seq_len)
    if _group_misfit(cfg, quant, r.group_size) is not None:
        return None
    if quant != r.quant:
        c["gemm_plugin"] = "disable" if quant == "fp8" else ("auto" if r.gemm_plugin == "disable" else r.gemm_plugin)
    if seq != r.max_seq_len:
        c["max_input_len"] = min(r.max_input_len, max(1, r.max_input_len * seq // r.max_seq_len))
    if r.kv_cache_max_tokens:
        c["kv_cache_max_tokens"] = max(seq, min(r.kv_cache_max_tokens, batch * seq))
    cand = r.replace(**c)
    try:
        validate(cand, t)
    except TrtGemmaError:
        return None
    return cand


def _plain(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def require_fit(p: Plan) -> None:
    """Raise FitError for a plan that does not fit (after the caller printed it)."""
    if p.fits:
        return
    fix = (f"use {p.suggestion['command']}" if p.suggestion
           else "no recipe fits this target: pick a smaller model or a larger target")
    raise FitError(f"{p.model} does not fit {p.target}: {p.reason}", fix=fix)
