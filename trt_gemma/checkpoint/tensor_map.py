"""The one HF -> TensorRT-LLM tensor mapping table for Gemma 2, expanded per layer, and the linear codecs' interface.

Split out of convert.py so that readers of source models (trt_gemma.checkpoint.hf: which tensors must a Gemma 2 dir hold?) and
quantized-source codecs (trt_gemma.checkpoint.codecs) can use the table without importing the converter: this module
imports neither of them at load time, which keeps the import graph free of cycles (tests/test_import_graph.py).
The table is read from TensorRT-LLM's models/gemma/convert.py (see docs/tensorrt-llm-contract.md "Tensor names").
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from trt_gemma.checkpoint.config import ModelConfig
from trt_gemma.checkpoint.dtypes import cast, from_f32, to_f32
from trt_gemma.checkpoint.st_io import TensorExpect

if TYPE_CHECKING:
    from trt_gemma.checkpoint.hf import HFModel

EMBEDDING, NORM, LINEAR, LM_HEAD = "embedding", "norm", "linear", "lm_head"


@dataclass(frozen=True)
class Entry:
    """One row of the mapping. `target`: TRT name (for LINEAR the module prefix; the codec adds `.weight`, scales...).
    `sources`: HF names (LINEAR: module prefixes) with their shapes as ModelConfig attribute names; several sources
    are concatenated on dim 0 (q, k, v). `split`: TP axis of each source (None: replicated). `tied_to`: HF tensor
    copied instead of `sources` when config.json ties the embeddings (Gemma 2 always does)."""

    kind: str
    target: str
    sources: tuple[tuple[str, tuple[str, ...]], ...]
    split: int | None = None
    tied_to: str | None = None


_L, _ATT, _MLP = "model.layers.{n}", "model.layers.{n}.self_attn", "model.layers.{n}.mlp"
_T = "transformer.layers.{n}"
VH, H = ("vocab_size", "hidden_size"), ("hidden_size",)
# Reference §3 (HfParser.rename_to_trt_llm + load_gemma_weights). Order = order in the rank files.
TABLE: tuple[Entry, ...] = (
    Entry(EMBEDDING, "transformer.vocab_embedding.weight", (("model.embed_tokens.weight", VH),), split=0),
    Entry(NORM, f"{_T}.input_layernorm.weight", ((f"{_L}.input_layernorm.weight", H),)),
    Entry(LINEAR, f"{_T}.attention.qkv", ((f"{_ATT}.q_proj", ("q_dim", "hidden_size")),
                                          (f"{_ATT}.k_proj", ("kv_dim", "hidden_size")),
                                          (f"{_ATT}.v_proj", ("kv_dim", "hidden_size"))), split=0),
    Entry(LINEAR, f"{_T}.attention.dense", ((f"{_ATT}.o_proj", ("hidden_size", "q_dim")),), split=1),
    Entry(NORM, f"{_T}.post_layernorm.weight", ((f"{_L}.post_attention_layernorm.weight", H),)),
    Entry(NORM, f"{_T}.pre_feedforward_layernorm.weight", ((f"{_L}.pre_feedforward_layernorm.weight", H),)),
    # GeGLU: TRT applies the activation to `fc`, so fc <- gate_proj and gate <- up_proj
    # (docs/tensorrt-llm-contract.md §3 pitfall)
    Entry(LINEAR, f"{_T}.mlp.fc", ((f"{_MLP}.gate_proj", ("intermediate_size", "hidden_size")),), split=0),
    Entry(LINEAR, f"{_T}.mlp.gate", ((f"{_MLP}.up_proj", ("intermediate_size", "hidden_size")),), split=0),
    Entry(LINEAR, f"{_T}.mlp.proj", ((f"{_MLP}.down_proj", ("hidden_size", "intermediate_size")),), split=1),
    Entry(NORM, f"{_T}.post_feedforward_layernorm.weight", ((f"{_L}.post_feedforward_layernorm.weight", H),)),
    Entry(NORM, "transformer.ln_f.weight", (("model.norm.weight", H),)),
    # TRT splits lm_head on dim 0 for every tp > 1 (load_gemma_weights: split_matrix_tp(param, ..., dim=0))
    Entry(LM_HEAD, "lm_head.weight", (("lm_head.weight", VH),), split=0, tied_to="model.embed_tokens.weight"),
)


# --- the Gemma 2 quirks applied to non-linear tensors (elementwise on storage arrays) ---------------------------

def gemma_norm(block: np.ndarray, src: str, dst: str) -> np.ndarray:
    """HF Gemma RMSNorm computes x*(1+w), TRT's RmsNorm x*w: store 1+w, added in float32 then cast
    (TRT models/gemma/convert.py: `param = param + 1.0  # upcasted to float32 in case of bfloat16`)."""
    with np.errstate(over="ignore"):
        return from_f32(to_f32(block, src) + np.float32(1.0), dst)


TRANSFORMS: dict[str, Callable[[np.ndarray, str, str], np.ndarray]] = {EMBEDDING: cast, LM_HEAD: cast, NORM: gemma_norm}


@dataclass(frozen=True)
class Job:
    """One table entry instantiated for one layer: sources resolved to names and shapes."""

    entry: Entry
    target: str
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    counted: bool = True  # False for the tied lm_head: a copy, not a use of the source

    def rank_shape(self, tp: int) -> tuple[int, ...]:
        """Per-rank shape: each source split on `split`, then concatenated on dim 0."""
        shapes = [list(s) for _, s in self.sources]
        if self.entry.split is not None:
            for s in shapes:
                s[self.entry.split] //= tp
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def pieces(self, tp: int, rank: int, suffix: str = "") -> list[tuple[str, slice, slice]]:
        """(source tensor, rows, cols) whose row-wise concatenation is rank `rank`'s tensor."""
        out = []
        for name, shape in self.sources:
            rows = cols = slice(None)
            if self.entry.split is not None and tp > 1:
                n = shape[self.entry.split] // tp
                part = slice(rank * n, (rank + 1) * n)
                rows, cols = (part, cols) if self.entry.split == 0 else (rows, part)
            out.append((name + suffix, rows, cols))
        return out


def plan(config: ModelConfig) -> list[Job]:
    """The table expanded over layers, in output order (per-layer entries interleaved layer by layer)."""
    def job(e: Entry, n: int | None) -> Job:
        srcs = tuple((s.format(n=n), tuple(getattr(config, d) for d in dims)) for s, dims in e.sources)
        if e.tied_to and config.tie_word_embeddings:
            return Job(e, e.target, ((e.tied_to, srcs[0][1]),), counted=False)
        return Job(e, e.target.format(n=n), srcs)

    first = next(i for i, e in enumerate(TABLE) if "{n}" in e.target)
    head = [job(e, None) for e in TABLE[:first]]
    layered = [e for e in TABLE if "{n}" in e.target]
    tail = [job(e, None) for e in TABLE[first:] if "{n}" not in e.target]
    return head + [job(e, n) for n in range(config.num_hidden_layers) for e in layered] + tail


# --- linear codecs ------------------------------------------------------------------------------------------------

class LinearCodec(Protocol):
    """How a linear layer is stored in the source and in the checkpoint. One codec per source quant format."""

    def source_tensors(self, module: str, shape: tuple[int, ...]) -> dict[str, TensorExpect]: ...

    def target_specs(self, job: Job, tp: int, st_dtype: str) -> list[tuple[str, str, tuple[int, ...]]]: ...

    def write(self, ctx: "object", job: Job, rank: int) -> None: ...


class FloatCodec:
    """Identity codec: `<module>.weight` [out, in] float -> `<target>.weight` in the model dtype
    (docs/tensorrt-llm-contract.md §4 'none'; also W8A16/W4A16, which TRT-LLM quantizes at build)."""

    def source_tensors(self, module, shape):
        return {f"{module}.weight": TensorExpect(tuple(shape))}

    def target_specs(self, job, tp, st_dtype):
        return [(f"{job.target}.weight", st_dtype, job.rank_shape(tp))]

    def write(self, ctx, job, rank):
        ctx.stream(job.pieces(ctx.tp, rank, ".weight"), rank, f"{job.target}.weight", cast)


FLOAT_CODEC = FloatCodec()


def codec_for(model: HFModel) -> LinearCodec:
    """The codec for the source's linear layers. Quantized sources get theirs with the quantization work."""
    from trt_gemma.checkpoint.codecs import codec_for_quantized  # ModelOpt unified-HF INT4-AWQ / FP8 sources

    return codec_for_quantized(model) or FLOAT_CODEC


def source_expectations(model: HFModel) -> dict[str, TensorExpect]:
    """Every source tensor the table reads, with shape and accepted dtypes (HFModel.open validates against it)."""
    codec, exp = codec_for(model), {}
    for job in plan(model.config):
        if job.counted:
            for name, shape in job.sources:
                exp.update(codec.source_tensors(name, shape) if job.entry.kind == LINEAR
                           else {name: TensorExpect(shape)})
    return exp


# --- what TensorRT-LLM's groupwise (INT4-AWQ) layers accept --------------------------------------------------------

# The dimensions TensorRT-LLM splits across tp ranks (evenly: split_matrix_tp): heads, KV heads, MLP width, vocab
TP_SPLIT_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
AWQ_PAD_MIN = 64  # WeightOnlyGroupwiseQuant{,Row}Linear: multiple = max(64, group_size) * tp_size (W4A16; W4A8: 128)
TP_CANDIDATES = (1, 2, 4, 8)


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Full (unsplit) [out, in] of each decoder linear as the TRT-LLM checkpoint stores it, read off TABLE's LINEAR
    rows for layer 0 ({"attention.qkv": (q + 2 kv, hidden), ...})."""
    return dict(_linear_shapes(config))


def parameter_count(config: ModelConfig) -> int:
    """Parameters as the HF tensors hold them (tied lm_head counted once): the embedding, per layer the linears of
    `linear_shapes` and 4 norms, the final norm."""
    h = config.hidden_size
    per_layer = 4 * h + sum(o * i for o, i in linear_shapes(config).values())
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return config.vocab_size * h + config.num_hidden_layers * per_layer + h + lm_head


@lru_cache(maxsize=32)  # the planner asks for every candidate recipe it tries; ModelConfig is frozen (hashable)
def _linear_shapes(config: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    prefix = _T.format(n=0) + "."
    return tuple((job.target[len(prefix):], job.rank_shape(1)) for job in plan(config)
                 if job.entry.kind == LINEAR and job.target.startswith(prefix))


def awq_padded(config: ModelConfig, tp: int, group_size: int) -> dict[str, tuple[int, int]]:
    """The linears TensorRT-LLM would pad at this tp: {name: (out, in)} whose full in or out features are not a
    multiple of max(64, group) * tp. TRT-LLM then expects the checkpoint's tensors at the padded shapes
    (tensorrt_llm/quantization/layers.py, docs/tensorrt-llm-contract.md "INT4-AWQ and tensor parallelism"); this
    converter writes unpadded tensors, so such a tp is refused (convert) and not offered (plan)."""
    multiple = max(AWQ_PAD_MIN, group_size) * tp
    return {name: (o, i) for name, (o, i) in linear_shapes(config).items() if o % multiple or i % multiple}


def awq_tp_sizes(config: ModelConfig, group_size: int, candidates=TP_CANDIDATES) -> list[int]:
    """The tp sizes at which an INT4-AWQ checkpoint of this model loads in TensorRT-LLM as written: no padding, and
    every split dimension divides (heads, KV heads, intermediate, vocab)."""
    splits = [getattr(config, f) for f in TP_SPLIT_FIELDS]
    return [tp for tp in candidates
            if all(d % tp == 0 for d in splits) and not awq_padded(config, tp, group_size)]
