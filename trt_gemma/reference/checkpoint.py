"""Read a TensorRT-LLM Gemma 2 checkpoint dir (config.json + rank{r}.safetensors) into float32 numpy arrays.

The layout is docs/tensorrt-llm-contract.md §2-4. TP shards are merged back on load, so the reference
runtime always sees the TP=1 model. How one linear layer is read depends on `quantization.quant_algo`; that is a
table (`LINEAR_FORMATS`) so a new format adds an entry (its tensors, dequantizer and activation hook), not a branch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trt_gemma.checkpoint.config import CHECKPOINT_NAMES, check_ranges
from trt_gemma.checkpoint.dtypes import to_f32
from trt_gemma.errors import ConfigError, InputError, UnsupportedModelError
from trt_gemma.checkpoint.quant_block import effective_excludes
from trt_gemma.reference.linear import Linear, LinearFormat
# scales split unlike their weights; quantized layouts and the FP8 KV cache (see LINEAR_FORMATS below)
from trt_gemma.reference.quantized import KV_CACHE_QUANT, QUANT_LINEAR_FORMATS, merge_quant_scales
from trt_gemma.checkpoint.st_io import TensorInfo, read_header, read_tensor
from trt_gemma.safe_io import read_json_object, resolve_in

SUPPORTED_ARCHITECTURES = ("Gemma2ForCausalLM",)
# Checkpoint-only sizes; the model's own (vocab_size, hidden_size, ...) are config.RANGES', checked by check_ranges
POSITIVE = ("tp_size", "pp_size", "group_size")
SLIDING, FULL = "sliding_attention", "full_attention"
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
NORMS = ("input_layernorm", "post_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

# config.json keys without a usable TRT-LLM default for Gemma 2 (head_size's default hidden/heads is wrong for 2b/9b).
REQUIRED = ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "head_size", "intermediate_size", "query_pre_attn_scalar")


@dataclass(frozen=True)
class CheckpointConfig:
    """The TensorRT-LLM checkpoint config.json (TRT-LLM field names), plus our `sliding_window`/`layer_types` keys
    (under "trt_gemma"; at the top level in older checkpoints)."""

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    query_pre_attn_scalar: float
    hidden_act: str = "gelu_pytorch_tanh"
    norm_epsilon: float = 1e-5  # TRT-LLM's schema default (the converter always writes Gemma's 1e-6)
    position_embedding_type: str = "rope_gpt_neox"
    max_position_embeddings: int = 8192
    rotary_base: float = 10000.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    logits_dtype: str = "float32"
    tp_size: int = 1
    pp_size: int = 1
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    exclude_modules: tuple[str, ...] = ()
    # Ours, not TRT-LLM's: TRT-LLM treats every Gemma 2 layer as global; without these keys so do we.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "CheckpointConfig":
        for key in REQUIRED:
            if d.get(key) is None:
                raise ConfigError(f"{source}: required field {key!r} is missing",
                                  fix="re-create the checkpoint with `trt-gemma convert`")
        if d["architecture"] not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: architecture {d['architecture']!r} is not supported by the reference runtime",
                fix=f"use a checkpoint of {', '.join(SUPPORTED_ARCHITECTURES)} made by `trt-gemma convert`")
        mapping, quant = d.get("mapping") or {}, d.get("quantization") or {}
        n_layers = int(d["num_hidden_layers"])
        # ours sit under "trt_gemma" (trt_gemma.checkpoint.convert.EXTRA_KEY); checkpoints written before kept them at the top
        ours = d["trt_gemma"] if isinstance(d.get("trt_gemma"), dict) else d
        layer_types = tuple(ours.get("layer_types") or (FULL,) * n_layers)
        try:
            cfg = cls(
                architecture=d["architecture"], dtype=str(d["dtype"]), vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]), num_hidden_layers=n_layers,
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                head_size=int(d["head_size"]), intermediate_size=int(d["intermediate_size"]),
                query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
                hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
                norm_epsilon=float(d.get("norm_epsilon", 1e-5)),
                position_embedding_type=str(d.get("position_embedding_type", "rope_gpt_neox")),
                max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
                rotary_base=float(d.get("rotary_base", 10000.0)),
                attn_logit_softcapping=_opt(float, d.get("attn_logit_softcapping")),
                final_logit_softcapping=_opt(float, d.get("final_logit_softcapping")),
                use_parallel_embedding=bool(d.get("use_parallel_embedding", False)),
                embedding_sharding_dim=int(d.get("embedding_sharding_dim", 0)),
                logits_dtype=str(d.get("logits_dtype", "float32")),
                tp_size=int(mapping.get("tp_size", 1)), pp_size=int(mapping.get("pp_size", 1)),
                quant_algo=quant.get("quant_algo"), kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
                group_size=int(quant.get("group_size") or 128),
                exclude_modules=tuple(quant.get("exclude_modules") or ()),
                sliding_window=_opt(int, ours.get("sliding_window")), layer_types=layer_types,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: a field has the wrong type ({e})",
                              fix="re-create the checkpoint with `trt-gemma convert`") from e
        cfg._validate(source, d, mapping)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "CheckpointConfig":
        path = Path(path)
        fix = "point at a TensorRT-LLM checkpoint dir made by `trt-gemma convert`"
        d = read_json_object(path, fix=fix)  # size and nesting capped, no link out of its dir
        return cls.from_dict(d, source=str(path))

    def _validate(self, source: str, d: dict, mapping: dict) -> None:
        fix = "re-create the checkpoint with `trt-gemma convert`"
        # sizes first: the divisibility checks below (and the loader) divide by them
        check_ranges(vars(self), source, fix, names=CHECKPOINT_NAMES)  # the same value ranges as an HF config
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{source}: {name} = {value} must be >= 1", fix=fix)
        checks = [
            (self.position_embedding_type == "rope_gpt_neox", "position_embedding_type must be 'rope_gpt_neox'"),
            (d.get("rotary_scaling") is None, "rotary_scaling is not supported (Gemma 2 has none)"),
            (not d.get("attn_bias") and not d.get("mlp_bias"), "attn_bias/mlp_bias must be false (Gemma 2 has none)"),
            (d.get("inter_layernorms", True), "inter_layernorms must be true for Gemma 2 (four norms per block)"),
            (self.pp_size == 1, "pipeline parallelism (pp_size > 1) is not supported"),
            (int(mapping.get("world_size", self.tp_size)) == self.tp_size * self.pp_size,
             "mapping.world_size must equal tp_size * pp_size"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.num_key_value_heads % self.tp_size == 0, "num_key_value_heads must divide by tp_size"),
            (len(self.layer_types) == self.num_hidden_layers and set(self.layer_types) <= {SLIDING, FULL},
             f"layer_types must list {self.num_hidden_layers} entries of {SLIDING!r}/{FULL!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"{source}: {msg}", fix=fix)

    def is_sliding(self, layer: int) -> bool:
        """transformers applies the window where layer_types[i] == 'sliding_attention' (and sliding_window is set)."""
        return self.sliding_window is not None and self.layer_types[layer] == SLIDING

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_size


def _opt(kind, v):
    return None if v is None else kind(v)


# ---- reading and TP merging -------------------------------------------------------------------------------------

class ShardSet:
    """The rank files of a checkpoint; `get(name)` returns the TP-merged tensor in its storage dtype."""

    def __init__(self, ckpt_dir: Path, cfg: CheckpointConfig):
        self.dir, self.cfg = Path(ckpt_dir), cfg
        self.files: list[Path] = []
        self.headers: list[dict[str, TensorInfo]] = []
        for r in range(cfg.tp_size):
            path = resolve_in(self.dir, f"rank{r}.safetensors")
            if not path.is_file():
                raise InputError(f"{path} is missing (config.json says tp_size={cfg.tp_size})",
                                 fix="copy every rank*.safetensors file, or re-run `trt-gemma convert`")
            self.files.append(path)
            self.headers.append(read_header(path)[0])
        self.used: set[str] = set()

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor as stored, over all ranks (what the weights cost on disk and, unquantized, on GPU)."""
        return sum(info.nbytes for h in self.headers for info in h.values())

    def has(self, name: str) -> bool:
        return name in self.headers[0]

    def info(self, name: str) -> TensorInfo:
        if name not in self.headers[0]:
            raise InputError(f"{self.files[0]}: tensor {name!r} is missing",
                             fix="re-create the checkpoint with `trt-gemma convert`")
        return self.headers[0][name]

    def get(self, name: str) -> np.ndarray:
        """The merged tensor in storage dtype (bf16 as uint16, fp8 as uint8)."""
        self.info(name)
        parts = []
        for path, header in zip(self.files, self.headers):
            if name not in header:
                raise InputError(f"{path}: tensor {name!r} is missing",
                                 fix="re-create the checkpoint with `trt-gemma convert`")
            parts.append(read_tensor(path, header[name]))
        self.used.add(name)
        return merge_tp(name, parts, self.cfg)

    def get_f32(self, name: str) -> np.ndarray:
        return to_f32(self.get(name), self.info(name).dtype)


def merge_tp(name: str, parts: list[np.ndarray], cfg: CheckpointConfig) -> np.ndarray:
    """Undo the TP split of docs/tensorrt-llm-contract.md §3 "TP split": qkv per-rank [q_r; k_r; v_r]; dense/proj on dim
    1; fc/gate/lm_head on dim 0; the embedding on `embedding_sharding_dim` when use_parallel_embedding; norms
    replicated.
    Splits are by proportion of dim 0, so packed layouts (AWQ's out/2 rows) merge the same way."""
    if len(parts) == 1:
        return parts[0]
    merged = merge_quant_scales(name, parts)
    if merged is not None:
        return merged
    if ".attention.qkv." in name:
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        pieces = []
        for p in parts:
            unit = p.shape[0] // (nq + 2 * nkv)
            pieces.append(np.split(p, [nq * unit, (nq + nkv) * unit]))
        return np.concatenate([np.concatenate([pc[i] for pc in pieces]) for i in range(3)])
    dim = _merge_dim(name, cfg)
    if dim is None:  # replicated: every rank holds the same tensor
        return parts[0]
    return np.concatenate(parts, axis=dim)


def _merge_dim(name: str, cfg: CheckpointConfig) -> int | None:
    if name.startswith("lm_head."):
        return 0
    if name.startswith("transformer.vocab_embedding."):
        return cfg.embedding_sharding_dim if cfg.use_parallel_embedding else None
    if any(f".{lin}." in name for lin in ("attention.dense", "mlp.proj")):
        return 1 if name.endswith(".weight") else None
    if any(f".{lin}." in name for lin in ("mlp.fc", "mlp.gate")):
        return 0
    return None


# ---- per-quant_algo linear formats --------------------------------------------------------------------------------

def _load_float(shards: ShardSet, prefix: str) -> Linear:
    return Linear.from_weight(shards.get_f32(f"{prefix}.weight"))


# quant_algo -> format: float here; the quantized ones (W4A16_AWQ, FP8, and W8A16/W4A16, whose float weights
# TensorRT-LLM quantizes at build) come from quantized.py, which imports nothing from this module (no import cycle).
LINEAR_FORMATS: dict[str | None, LinearFormat] = {None: LinearFormat("float weights", _load_float)}
LINEAR_FORMATS.update(QUANT_LINEAR_FORMATS)
# kv_cache_quant_algo values the reference can emulate: a float cache, and FP8 from quantized.py.
KV_CACHE_FORMATS: tuple[str | None, ...] = (None, *KV_CACHE_QUANT)


def linear_format(cfg: CheckpointConfig, source: str) -> LinearFormat:
    if cfg.quant_algo not in LINEAR_FORMATS:
        known = ", ".join(str(k) for k in LINEAR_FORMATS)
        raise UnsupportedModelError(f"{source}: quantization.quant_algo {cfg.quant_algo!r} is not supported by "
                                    f"the reference runtime (supported: {known})",
                                    fix="convert without quantization, or use a format listed")
    if cfg.kv_cache_quant_algo not in KV_CACHE_FORMATS:
        raise UnsupportedModelError(f"{source}: kv_cache_quant_algo {cfg.kv_cache_quant_algo!r} is not supported "
                                    "by the reference runtime", fix="use a checkpoint with a float KV cache")
    return LINEAR_FORMATS[cfg.quant_algo]


def is_excluded(module: str, cfg: CheckpointConfig) -> bool:
    """quantization.exclude_modules holds fnmatch patterns (TRT-LLM uses fnmatch.fnmatchcase); null or empty means
    TensorRT-LLM's default patterns (quant_block.effective_excludes), which exclude lm_head and the embedding."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(module, pat) for pat in effective_excludes(cfg.exclude_modules))


def check_all_used(shards: ShardSet) -> None:
    """Every tensor in the checkpoint is read exactly by the loader; a stray one means a layout we do not understand."""
    extra = sorted(set(shards.headers[0]) - shards.used)
    if extra:
        raise InputError(f"{shards.files[0]}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}",
                         fix="this checkpoint layout (quantized?) is not supported by the reference runtime yet")

