"""Linear codecs that turn a ModelOpt unified-HF quantized checkpoint into TensorRT-LLM's W4A16_AWQ / FP8 layouts.

They plug into the converter's one mapping table (trt_gemma/checkpoint/tensor_map.py `LinearCodec`): the table says which HF modules
form which TRT-LLM linear (q,k,v -> attention.qkv; gate_proj -> mlp.fc; ...), a codec says which tensors one module
has in the source and how a fused group is written. Layouts: docs/tensorrt-llm-contract.md §2 (quantization
block) and §4; what ModelOpt 0.47 writes: docs/quantization.md.

ModelOpt 0.47 unified export (modelopt/torch/export/unified_export_hf.py, quant_utils.py), per linear `<m>`:
- INT4-AWQ: `<m>.weight` uint8 [out/2, in] (low nibble = even output row, the TRT-LLM packing), `<m>.weight_scale`
  float32 [out, in/group] (amax/7), `<m>.pre_quant_scale` [in] only where it was NOT folded: q/k/v and gate/up share
  one averaged scale (`preprocess_linear_fusion`) that `fuse_prequant_layernorm` folds into Gemma's input /
  pre-feedforward norm as (1+w)*s-1, so those linears carry none. The folded norm is carried as is (TRT-LLM stores
  (1+w) and the +1 cancels the -1), and their `prequant_scaling_factor` is written as ones: the math is unchanged.
- FP8: `<m>.weight` float8_e4m3fn, scalar float32 `<m>.weight_scale` (amax/448) and `<m>.input_scale`; the unified
  export does NOT unify q/k/v scales (FP8 is skipped in `_fuse_shared_input_modules`), but TRT-LLM's fused qkv has one
  weight and one activation scale. We take the max (what ModelOpt's TRT-LLM export does in `build_qkv` via
  `preprocess_linear_fusion`) and re-quantize the members whose scale differs (a second fp8 rounding;
  `trt_gemma.quant.modelopt` avoids it for its own exports by unifying the scales before exporting).
- FP8 KV cache: `k_proj.k_scale` / `v_proj.v_scale` = amax/448 each; TRT-LLM has one
  `attention.kv_cache_scaling_factor` per layer = max(k, v) clamped to >= 1.0 (ModelOpt `get_kv_cache_scaling_factor`
  with clamp_fp8_scales, "For FP8, we recommend default kv cache scaling factor to be 1";
  docs/tensorrt-llm-contract.md §4 "FP8").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trt_gemma.checkpoint.dtypes import cast, f32_to_fp8_e4m3, fp8_e4m3_to_f32, from_f32
from trt_gemma.checkpoint.quant_block import quantization_block as _block
from trt_gemma.errors import ConfigError, InputError, UnsupportedModelError
from trt_gemma.checkpoint.st_io import FLOAT_DTYPES, TensorExpect
from trt_gemma.safe_io import read_json

HF_QUANT_CONFIG = "hf_quant_config.json"
KV_MIN_SCALE = 1.0  # ModelOpt clamps FP8 KV scales to >= 1.0 for TensorRT-LLM (quant_utils.get_kv_cache_scaling_factor)
KV_SOURCES = {"k_proj": "k_scale", "v_proj": "v_scale"}  # ModelOpt _KV_CACHE_REPLACEMENTS
SUPPORTED_ALGOS = ("W4A16_AWQ", "FP8")
SUPPORTED_KV = (None, "FP8")
# exclude patterns we can honour: the head stays float anyway (docs/tensorrt-llm-contract.md §4, #1394)
UNQUANTIZED_OK = ("lm_head",)
FIX_REEXPORT = "re-export it with ModelOpt's unified HF export (export_hf_checkpoint), or run `trt-gemma quantize` " \
               "on the unquantized model"


@dataclass(frozen=True)
class QuantSpec:
    """The quantization a ModelOpt unified-HF checkpoint declares (hf_quant_config.json, else config.json)."""

    quant_algo: str
    kv_cache_quant_algo: str | None
    exclude_modules: tuple[str, ...]
    source: str


def read_quant_spec(path: Path, raw_config: dict) -> QuantSpec | None:
    """None for a float checkpoint; a QuantSpec for a ModelOpt one; UnsupportedModelError for other quantizers."""
    qc = raw_config.get("quantization_config")
    hqc_file = Path(path) / HF_QUANT_CONFIG
    if not qc and not hqc_file.exists():
        return None
    method = (qc or {}).get("quant_method", "modelopt")
    if method != "modelopt":
        raise UnsupportedModelError(f"{path}: the weights are already quantized ({method}); only ModelOpt unified "
                                    "checkpoints are read", fix="convert the unquantized model, or use `trt-gemma "
                                    "quantize` for INT4-AWQ / FP8")
    if hqc_file.exists():
        try:
            q = read_json(hqc_file)["quantization"]  # capped, never through a link out of the model dir
        except (InputError, KeyError, TypeError) as e:
            raise UnsupportedModelError(f"{hqc_file}: not a ModelOpt quant config (needs a 'quantization' object)",
                                        fix=FIX_REEXPORT) from e
        algo, kv, excl, src = q.get("quant_algo"), q.get("kv_cache_quant_algo"), q.get("exclude_modules"), hqc_file
    else:
        kv_scheme = qc.get("kv_cache_scheme") or {}
        kv = qc.get("kv_cache_quant_algo") or ("FP8" if kv_scheme.get("type") == "float" and
                                               kv_scheme.get("num_bits") == 8 else None)
        algo, excl, src = qc.get("quant_algo"), qc.get("ignore"), Path(path) / "config.json"
    return _check_spec(QuantSpec(algo, kv, tuple(excl or ()), str(src)))


def _check_spec(spec: QuantSpec) -> QuantSpec:
    if spec.quant_algo not in SUPPORTED_ALGOS:
        raise UnsupportedModelError(f"{spec.source}: the weights are already quantized with quant_algo "
                                    f"{spec.quant_algo!r}; this converter reads {', '.join(SUPPORTED_ALGOS)}",
                                    fix="use an INT4-AWQ or FP8 ModelOpt checkpoint, or the unquantized model")
    if spec.kv_cache_quant_algo not in SUPPORTED_KV:
        raise UnsupportedModelError(f"{spec.source}: kv_cache_quant_algo {spec.kv_cache_quant_algo!r} is not "
                                    "supported (FP8 or none)", fix="quantize with an FP8 KV cache or none")
    other = [m for m in spec.exclude_modules if m not in UNQUANTIZED_OK]
    if other:
        raise UnsupportedModelError(f"{spec.source}: exclude_modules {other} leaves some linears unquantized "
                                    "(mixed precision), which the TRT-LLM Gemma 2 layout here does not carry",
                                    fix="quantize every decoder linear (exclude only lm_head)")
    return spec


def quantization_block(spec: QuantSpec, group_size: int) -> dict:
    """config.json `quantization` (reference: QuantConfig fields; pre_quant_scale True for AWQ, lm_head excluded),
    written by trt_gemma.checkpoint.quant_block like every other block."""
    return _block(spec.quant_algo, spec.kv_cache_quant_algo, group_size,
                  pre_quant_scale=spec.quant_algo == "W4A16_AWQ")


# --- shared helpers -------------------------------------------------------------------------------------------------

def _module_kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _is_qkv(job) -> bool:
    return job.target.endswith("attention.qkv")


def _kv_target(job) -> str:
    return job.target.rsplit(".", 1)[0] + ".kv_cache_scaling_factor"


def _scalar_expect(tensors: dict, name: str) -> TensorExpect:
    """ModelOpt writes per-tensor scales as 0-d tensors; other writers use [1]. Accept both, nothing bigger."""
    shape = tensors[name][1].shape if name in tensors else ()
    return TensorExpect(shape if tuple(shape) in ((), (1,)) else (), ("F32",) + FLOAT_DTYPES[1:])


def _read_scalar(ctx, name: str) -> float:
    value = float(np.asarray(ctx.model.read_f32(name)).reshape(-1)[0])
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{ctx.model.tensors[name][0]}: scale {name} = {value} (must be finite and > 0)",
                         fix="the quantized checkpoint is corrupt; re-export or re-download it")
    return value


def _write_f32_scalar(ctx, rank: int, name: str, value: float) -> None:
    ctx.write(rank, name, np.array([value], np.float32))


class _Codec:
    """Common parts: the quantization block and the per-layer FP8 KV scale carried by the qkv job."""

    def __init__(self, spec: QuantSpec, tensors: dict):
        self.spec, self.tensors = spec, tensors
        self.kv = spec.kv_cache_quant_algo == "FP8"

    def _kv_sources(self, module: str) -> dict[str, TensorExpect]:
        suffix = KV_SOURCES.get(_module_kind(module)) if self.kv else None
        return {f"{module}.{suffix}": _scalar_expect(self.tensors, f"{module}.{suffix}")} if suffix else {}

    def _kv_specs(self, job) -> list:
        return [(_kv_target(job), "F32", (1,))] if self.kv and _is_qkv(job) else []

    def _write_kv(self, ctx, job, rank: int) -> None:
        if not (self.kv and _is_qkv(job)):
            return
        scales = [_read_scalar(ctx, f"{m}.{KV_SOURCES[_module_kind(m)]}") for m, _ in job.sources
                  if _module_kind(m) in KV_SOURCES]
        _write_f32_scalar(ctx, rank, _kv_target(job), max(scales + [KV_MIN_SCALE]))


# --- INT4 AWQ -------------------------------------------------------------------------------------------------------

class AWQCodec(_Codec):
    """ModelOpt INT4-AWQ linears -> TRT-LLM W4A16_AWQ: weight int8 [out/2, in], weights_scaling_factor [out, in/g] and
    prequant_scaling_factor [in] in the model dtype (docs/tensorrt-llm-contract.md §4)."""

    def __init__(self, spec: QuantSpec, tensors: dict, group_size: int):
        super().__init__(spec, tensors)
        self.group_size = group_size

    @property
    def quantization(self) -> dict:
        return quantization_block(self.spec, self.group_size)

    def source_tensors(self, module, shape):
        out, inp = shape
        exp = {f"{module}.weight": TensorExpect((out // 2, inp), ("U8", "I8")),
               f"{module}.weight_scale": TensorExpect((out, inp // self.group_size))}
        if f"{module}.pre_quant_scale" in self.tensors:
            exp[f"{module}.pre_quant_scale"] = TensorExpect((inp,))
        return {**exp, **self._kv_sources(module)}

    def target_specs(self, job, tp, st_dtype):
        out, inp = job.rank_shape(tp)
        if inp % self.group_size or out % 2:
            raise ConfigError(f"--tp {tp}: {job.target} would get [{out}, {inp}] per rank; INT4-AWQ needs an even "
                              f"row count and in_features divisible by the group size {self.group_size}",
                              fix="use a smaller --tp")
        return [(f"{job.target}.weight", "I8", (out // 2, inp)),
                (f"{job.target}.weights_scaling_factor", st_dtype, (out, inp // self.group_size)),
                (f"{job.target}.prequant_scaling_factor", st_dtype, (inp,))] + self._kv_specs(job)

    def write(self, ctx, job, rank):
        packed = [(src, _halve(rows), cols) for src, rows, cols in job.pieces(ctx.tp, rank, ".weight")]
        _stream_raw(ctx, packed, rank, f"{job.target}.weight", _as_int8)
        scales = [(src, rows, _div(cols, self.group_size)) for src, rows, cols in job.pieces(ctx.tp, rank,
                                                                                           ".weight_scale")]
        ctx.stream(scales, rank, f"{job.target}.weights_scaling_factor", cast)
        pqs = self._prequant(ctx, job)
        cols = job.pieces(ctx.tp, rank)[0][2]
        ctx.write(rank, f"{job.target}.prequant_scaling_factor", from_f32(pqs[cols], ctx.st_dtype))
        self._write_kv(ctx, job, rank)

    def _prequant(self, ctx, job) -> np.ndarray:
        """The group's shared AWQ input scale; ones where ModelOpt folded it into the preceding Gemma norm."""
        names = [f"{m}.pre_quant_scale" for m, _ in job.sources]
        present = [n for n in names if n in self.tensors]
        inp = job.sources[0][1][1]
        if not present:
            return np.ones(inp, np.float32)
        if len(present) != len(names):
            raise UnsupportedModelError(f"{ctx.model.path}: {', '.join(sorted(set(names) - set(present)))} missing "
                                        f"while {present[0]} exists; TRT-LLM's {job.target} needs one shared "
                                        "pre-quant scale", fix=FIX_REEXPORT)
        scales = [ctx.model.read_f32(n) for n in present]
        if any(not np.array_equal(scales[0], s) for s in scales[1:]):
            raise UnsupportedModelError(f"{ctx.model.path}: {', '.join(present)} differ; TRT-LLM's {job.target} "
                                        "shares one pre-quant scale (ModelOpt's export averages and re-smooths them)",
                                        fix=FIX_REEXPORT)
        return scales[0]


def _stream_raw(ctx, pieces, rank: int, target: str, transform) -> None:
    """Like the converter's `ctx.stream`, for integer / fp8 codes: same row blocks, no float finiteness check
    (the bytes are codes, not floats); fp8 NaN codes are refused by name instead."""
    for src, info, block, _ in ctx.blocks(pieces):
        if info.dtype == "F8_E4M3" and np.any((block & 0x7F) == 0x7F):
            raise InputError(f"{ctx.model.tensors[src][0]}: tensor {src} contains FP8 NaN codes",
                             fix="the quantized checkpoint is corrupt; re-export or re-download it")
        ctx.write(rank, target, transform(block, info.dtype, ctx.st_dtype))


def _as_int8(block: np.ndarray, src: str, dst: str) -> np.ndarray:
    """ModelOpt >= 0.2x stores the packed nibbles as uint8; TRT-LLM's checkpoint dtype is int8 (same bytes)."""
    return np.ascontiguousarray(block).view(np.int8)


def _halve(rows: slice) -> slice:
    """Output-row range -> packed-row range (two output rows per byte row)."""
    if rows == slice(None):
        return rows
    return slice(rows.start // 2, rows.stop // 2)


def _div(cols: slice, group: int) -> slice:
    if cols == slice(None):
        return cols
    return slice(cols.start // group, cols.stop // group)


# --- FP8 ------------------------------------------------------------------------------------------------------------

class FP8Codec(_Codec):
    """ModelOpt FP8 linears -> TRT-LLM FP8: weight float8_e4m3fn [out, in], weights_scaling_factor and
    activation_scaling_factor [1] float32 (docs/tensorrt-llm-contract.md §4). A fused
    group gets the max of its members' scales."""

    @property
    def quantization(self) -> dict:
        return quantization_block(self.spec, 128)

    def source_tensors(self, module, shape):
        exp = {f"{module}.weight": TensorExpect(tuple(shape), ("F8_E4M3",))}
        for s in ("weight_scale", "input_scale"):
            exp[f"{module}.{s}"] = _scalar_expect(self.tensors, f"{module}.{s}")
        return {**exp, **self._kv_sources(module)}

    def target_specs(self, job, tp, st_dtype):
        return [(f"{job.target}.weight", "F8_E4M3", job.rank_shape(tp)),
                (f"{job.target}.weights_scaling_factor", "F32", (1,)),
                (f"{job.target}.activation_scaling_factor", "F32", (1,))] + self._kv_specs(job)

    def write(self, ctx, job, rank):
        wsf = [_read_scalar(ctx, f"{m}.weight_scale") for m, _ in job.sources]
        shared = max(wsf)
        for (src, rows, cols), own in zip(job.pieces(ctx.tp, rank, ".weight"), wsf):
            _stream_raw(ctx, [(src, rows, cols)], rank, f"{job.target}.weight", _requantize(own, shared))
        _write_f32_scalar(ctx, rank, f"{job.target}.weights_scaling_factor", shared)
        asf = max(_read_scalar(ctx, f"{m}.input_scale") for m, _ in job.sources)
        _write_f32_scalar(ctx, rank, f"{job.target}.activation_scaling_factor", asf)
        self._write_kv(ctx, job, rank)


def _requantize(own: float, shared: float):
    """fp8 codes at scale `own` -> codes at `shared` (identity when equal: the bytes pass through untouched)."""
    def transform(block: np.ndarray, src: str, dst: str) -> np.ndarray:
        if own == shared:
            return np.ascontiguousarray(block)
        return f32_to_fp8_e4m3(fp8_e4m3_to_f32(block) * np.float32(own) / np.float32(shared))
    return transform


# --- selection ------------------------------------------------------------------------------------------------------

def codec_for_quantized(model) -> "_Codec | None":
    """The codec for an opened HF model dir (trt_gemma.checkpoint.hf.HFModel), None when its weights are float."""
    spec = read_quant_spec(model.path, model.raw_config)
    if spec is None:
        return None
    probe = "model.layers.0.self_attn.q_proj"
    needed = f"{probe}.weight_scale"
    if needed not in model.tensors:
        raise UnsupportedModelError(f"{model.path}: config says the weights are already quantized "
                                    f"({spec.quant_algo}) but {needed} is missing: not ModelOpt's unified HF layout",
                                    fix=FIX_REEXPORT)
    if spec.quant_algo == "FP8":
        return FP8Codec(spec, model.tensors)
    cols = model.tensors[needed][1].shape
    hidden = model.config.hidden_size
    if len(cols) != 2 or cols[1] == 0 or hidden % cols[1]:
        raise UnsupportedModelError(f"{model.path}: {needed} has shape {list(cols)}; expected [q_dim, hidden/group]",
                                    fix=FIX_REEXPORT)
    return AWQCodec(spec, model.tensors, hidden // cols[1])
