"""Gemma 2 model configuration, read from a Hugging Face config.json in either dialect.

Two dialects exist (docs/tensorrt-llm-contract.md §0):
- the Hub's 2024 files: `rope_theta`, `torch_dtype`, `hidden_act` and/or `hidden_activation`, no `layer_types`
  (even layers use the sliding window: transformers' `is_sliding = not bool(layer_idx % 2)`);
- files written by transformers >= 5: `rope_parameters: {rope_theta, rope_type}`, `dtype`, `layer_types`.
Field names follow HF. Unknown keys are ignored; a missing required key raises ConfigError naming it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from trt_gemma.errors import ConfigError, InputError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("Gemma2ForCausalLM",)
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    dtype: str = "bfloat16"
    architecture: str = "Gemma2ForCausalLM"
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or ([d["architecture"]] if "architecture" in d else [])
        archs = [archs] if isinstance(archs, str) else archs
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
                fix="trt_gemma converts Gemma 2 models only: gemma-2-2b/9b/27b (and -it), shieldgemma-2b",
            )
        try:
            cfg = cls._parse(d, arch, source)
        except (TypeError, ValueError, AttributeError, IndexError) as e:  # e.g. "vocab_size": "big", eos []
            raise ConfigError(f"{source}: a field has the wrong type or form ({e})",
                              fix=f"fix {source} or re-download it") from e
        cfg.validate(source)
        return cfg

    @classmethod
    def _parse(cls, d: dict, arch: str, source: str) -> "ModelConfig":
        for key in cls.REQUIRED:
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: required field {key!r} is missing", fix=f"add {key!r} to {source}")
        n_layers = _int(d["num_hidden_layers"])
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        layer_types = tuple(d.get("layer_types") or ())
        if not layer_types:
            layer_types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers))
        if len(layer_types) != n_layers or any(t not in (SLIDING, FULL) for t in layer_types):
            raise ConfigError(f"{source}: layer_types must list {n_layers} entries of {SLIDING!r}/{FULL!r}",
                              fix="fix layer_types or delete it (even layers then slide, as in the Hub's files)")
        eos = d.get("eos_token_id", 1)
        return cls(
            vocab_size=_int(d["vocab_size"]), hidden_size=_int(d["hidden_size"]),
            intermediate_size=_int(d["intermediate_size"]), num_hidden_layers=n_layers,
            num_attention_heads=_int(d["num_attention_heads"]), num_key_value_heads=_int(d["num_key_value_heads"]),
            head_dim=_int(d["head_dim"]),
            query_pre_attn_scalar=float(_default(d.get("query_pre_attn_scalar"), 256)),  # Gemma2Config's default
            max_position_embeddings=_int(d.get("max_position_embeddings", 8192)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
            # absent (not null) keys: the field defaults, which are transformers' Gemma2Config defaults
            attn_logit_softcapping=_opt_float(d.get("attn_logit_softcapping", cls.attn_logit_softcapping)),
            final_logit_softcapping=_opt_float(d.get("final_logit_softcapping", cls.final_logit_softcapping)),
            sliding_window=_opt_int(d.get("sliding_window", cls.sliding_window)), layer_types=layer_types,
            # transformers' Gemma2Config reads only `hidden_activation`; `hidden_act` (in the Hub's files) is ignored
            hidden_activation=d.get("hidden_activation") or cls.hidden_activation,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"), architecture=arch,
            bos_token_id=_int(d.get("bos_token_id", 2)),
            eos_token_id=_int(eos[0] if isinstance(eos, list) else eos),
            pad_token_id=_int(d.get("pad_token_id", 0) or 0),
        )

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        from trt_gemma.safe_io import read_json_object

        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise InputError(f"{path} not found", fix="point at a Hugging Face model dir containing config.json")
        d = read_json_object(path, fix="re-download config.json")  # size and nesting capped, no link out of its dir
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        check_ranges({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, source,
                     fix="check the model's config.json (or re-download it)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}", fix="check the model's config.json")
        # tanh GELU only: exact "gelu" would differ from what the reference runtime and TRT-LLM's Gemma run
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{source}: hidden_activation {self.hidden_activation!r} is not Gemma 2's GeGLU",
                              fix="Gemma 2 uses gelu_pytorch_tanh")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` uses the sliding window (transformers: layer_types[i] == 'sliding_attention')."""
        return self.sliding_window is not None and self.layer_types[layer] == SLIDING

    def to_hf_dict(self) -> dict:
        """A transformers-loadable config.json (Hub 2024 dialect plus layer_types, read by both generations)."""
        d = dataclasses.asdict(self)
        d.pop("architecture")
        d["architectures"] = [self.architecture]
        d["model_type"] = "gemma2"
        d["torch_dtype"] = d["dtype"]
        d["hidden_act"] = d["hidden_activation"]
        d["layer_types"] = list(self.layer_types)
        return d

    # parameter counts (used by the planner)
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field. Floats must also be finite (JSON allows NaN and Infinity)."""

    low: float
    low_open: bool = False        # True: the bound itself is refused (> low), else >= low
    high: float | None = None     # exclusive upper bound
    nullable: bool = False        # null is allowed (the feature is off)
    why: str = "a size or count"


_SIZE = Range(1)
_TOKEN = Range(0, why="a token id (also < vocab_size)")
# Every numeric field of ModelConfig (HF names), checked once where a config is read, for every command. Values
# outside these ranges convert "fine" and then compute NaN or only pad tokens (rms_norm_eps NaN, rope_theta 0, ...).
RANGES: dict[str, Range] = {
    **{k: _SIZE for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")},
    "rms_norm_eps": Range(0.0, low_open=True, high=1.0,
                          why="added to the mean square before the 1/sqrt; Gemma 2: 1e-6"),
    "rope_theta": Range(0.0, low_open=True, why="the RoPE base: 0 or less gives NaN angles; Gemma 2: 10000"),
    "query_pre_attn_scalar": Range(0.0, low_open=True, why="q is scaled by its inverse square root"),
    "attn_logit_softcapping": Range(0.0, low_open=True, nullable=True,
                                    why="cap * tanh(x / cap): 0 divides by zero; null turns the cap off"),
    "final_logit_softcapping": Range(0.0, low_open=True, nullable=True,
                                     why="cap * tanh(x / cap): 0 divides by zero; null turns the cap off"),
    "sliding_window": Range(1, nullable=True, why="tokens a sliding layer sees; null: no sliding window"),
    "bos_token_id": _TOKEN, "eos_token_id": _TOKEN, "pad_token_id": _TOKEN,
}
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# A TensorRT-LLM checkpoint's config.json names for the same fields (reference/checkpoint.py reads it).
CHECKPOINT_NAMES = {"norm_epsilon": "rms_norm_eps", "rotary_base": "rope_theta", "head_size": "head_dim"}


def check_ranges(values: dict, source: str, fix: str, names: dict[str, str] | None = None) -> None:
    """Raise ConfigError naming the first field of `values` outside its RANGES entry. `names` maps the keys of
    `values` to RANGES keys (a TensorRT-LLM checkpoint says norm_epsilon for rms_norm_eps, ...)."""
    names = names or {}
    for key, v in values.items():
        r = RANGES.get(names.get(key, key))
        if r is None:
            continue
        if v is None:
            if r.nullable:
                continue
            raise ConfigError(f"{source}: {key} is null; it must be a number ({r.why})", fix=fix)
        bad = not math.isfinite(v) or v < r.low or (r.low_open and v == r.low) or (r.high is not None and v >= r.high)
        vocab = values.get("vocab_size")
        if names.get(key, key) in TOKEN_FIELDS and isinstance(vocab, int) and v >= vocab:
            bad = True
        if bad:
            rng = f"{'>' if r.low_open else '>='} {r.low:g}" + (f" and < {r.high:g}" if r.high is not None else "")
            rng += " (or null)" if r.nullable else ""
            rng += f" and < vocab_size {vocab}" if names.get(key, key) in TOKEN_FIELDS else ""
            rng = ("finite and " if isinstance(r.low, float) else "") + rng
            raise ConfigError(f"{source}: {key} = {v} must be {rng} ({r.why})", fix=fix)


def _int(v) -> int:
    """int() that refuses what it would silently change: 2.5 -> 2, true -> 1."""
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


def _default(v, default):
    """`v` unless it is null (`v or default` would turn a 0 into the default and hide it from the range check)."""
    return default if v is None else v


def _opt_float(v):
    return None if v is None else float(v)


def _opt_int(v):
    return None if v is None else _int(v)


# Real HF config values of the Gemma 2 family (docs/tensorrt-llm-contract.md §1; 9b/27b recalled HF values).
_COMMON = dict(vocab_size=256000, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
               hidden_activation="gelu_pytorch_tanh", torch_dtype="bfloat16", architectures=["Gemma2ForCausalLM"])
PRESETS: dict[str, dict] = {
    "gemma-2-2b": dict(_COMMON, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma-2-9b": dict(_COMMON, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma-2-27b": dict(_COMMON, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}
PRESETS["shieldgemma-2b"] = dict(PRESETS["gemma-2-2b"])


def preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(PRESETS[name], source=f"preset {name}")
