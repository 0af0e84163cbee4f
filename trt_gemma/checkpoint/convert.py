"""Hugging Face Gemma 2 -> TensorRT-LLM checkpoint (config.json + rank{r}.safetensors), streaming.

The layout is docs/tensorrt-llm-contract.md §2-4, itself read from TensorRT-LLM's
tensorrt_llm/models/gemma/convert.py (`load_gemma_weights`) and models/gemma/config.py.

How it stays within bounded memory (TensorRT-LLM's own converter loads the whole model as float32 numpy): every output
tensor of every rank is described up front from config.json alone (name, dtype, shape), one `StreamingWriter` per rank
writes the safetensors header from those specs, and then each tensor is produced as a sequence of *pieces*
(source tensor, row range, column range) streamed in row blocks of at most BLOCK_BYTES (as float32). A TP split is
just a different set of pieces: q, k and v each split on dim 0 and concatenated per rank, `dense`/`proj` split on
dim 1, `fc`/`gate`/embedding/lm_head on dim 0. All transforms are elementwise (cast, Gemma's (1+w)), so row blocks
are exact. Peak memory is a few blocks, whatever the model size.

The mapping is one table (TABLE). Linear layers go through a *linear codec*: the float path is the identity codec
(FloatCodec); a quantized source format (ModelOpt unified HF: weight_scale, pre_quant_scale, ...) plugs in its own
codec that declares its source tensors, its target tensors and how one fused group is written.
"""
from __future__ import annotations

import hashlib
import json
import platform
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trt_gemma.checkpoint.config import ModelConfig
from trt_gemma.checkpoint.dtypes import NAME_TO_ST, cast, from_f32, to_f32  # noqa: F401  (convert.cast: re-exported)
from trt_gemma.errors import ConfigError, InputError, OutputError
from trt_gemma.fsutil import atomic_output_dir, check_output_target
from trt_gemma.safe_io import copy_in
from trt_gemma.checkpoint.quant_block import quantization_block
from trt_gemma.checkpoint.hf import INDEX_FILE, SINGLE_FILE, HFModel, resolve_model
from trt_gemma.console import progress
from trt_gemma.checkpoint.st_io import StreamingWriter
# The mapping table and its codecs live in trt_gemma.checkpoint.tensor_map (importable without the converter); re-exported here.
from trt_gemma.checkpoint.tensor_map import (EMBEDDING, FLOAT_CODEC, LINEAR, LM_HEAD, NORM, TABLE, TRANSFORMS,  # noqa: F401
                                  AWQ_PAD_MIN, TP_SPLIT_FIELDS, Entry, FloatCodec, Job, LinearCodec, awq_padded,
                                  awq_tp_sizes, codec_for, gemma_norm, plan, source_expectations)

BLOCK_BYTES = 16 << 20  # row-block budget, counted as float32 (the widest intermediate)
PROVENANCE_FILE = "trt_gemma_provenance.json"
# Our own config.json keys live under one namespaced key: TRT-LLM turns unknown keys into GemmaConfig attributes and
# its Gemma 3 paths read `sliding_window`, so a top-level one in a Gemma 2 checkpoint could be picked up by TRT-LLM.
EXTRA_KEY = "trt_gemma"
# docs/tensorrt-llm-contract.md §2 QuantAlgo strings; weights stay float (§4)
WEIGHT_ONLY_ALGOS = {"int8": "W8A16", "int4": "W4A16"}

def target_specs(jobs: list[Job], codec: LinearCodec, tp: int, st_dtype: str) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of every tensor of one rank file, in write order (the same for every rank)."""
    specs = []
    for job in jobs:
        specs += (codec.target_specs(job, tp, st_dtype) if job.entry.kind == LINEAR
                  else [(job.target, st_dtype, job.rank_shape(tp))])
    return specs


def check_complete(jobs: list[Job], codec: LinearCodec, available, tp: int = 1) -> None:
    """Every available source tensor used exactly once, every used one available, every target written once."""
    used = Counter()
    for job in jobs:
        if job.counted:
            for name, shape in job.sources:
                used.update(list(codec.source_tensors(name, shape)) if job.entry.kind == LINEAR else [name])
    twice = sorted(n for n, c in used.items() if c > 1)
    unmapped = sorted(set(available) - set(used))
    missing = sorted(set(used) - set(available))
    targets = Counter(name for name, _, _ in target_specs(jobs, codec, tp, "F32"))
    dup_targets = sorted(n for n, c in targets.items() if c > 1)
    for what, names in (("used more than once", twice), ("not mapped to any checkpoint tensor", unmapped),
                        ("required by the mapping but missing", missing), ("produced twice", dup_targets)):
        if names:
            shown = ", ".join(names[:6]) + (f" ... and {len(names) - 6} more" if len(names) > 6 else "")
            raise InputError(f"tensor(s) {what}: {shown}",
                             fix="the weights do not match Gemma 2's layout in config.json; use the original files")


# --- streaming ----------------------------------------------------------------------------------------------------

# storage dtype -> (unsigned view, exponent mask, sign-less mask)
_EXP_BITS = {"BF16": (np.uint16, 0x7F80, 0x7FFF), "F16": (np.uint16, 0x7C00, 0x7FFF),
             "F32": (np.uint32, 0x7F800000, 0x7FFFFFFF)}


def count_nonfinite(a: np.ndarray, st_dtype: str) -> int:
    """NaN/Inf count from the exponent bits (all ones), on the storage array without decoding it.
    Fast path: |bits| < exponent mask for every value means all finite (one temporary and one max)."""
    utype, exp, absmask = _EXP_BITS[st_dtype]
    u = a.view(utype)
    if u.size == 0 or (u & utype(absmask)).max() < utype(exp):
        return 0
    return int(np.count_nonzero((u & utype(exp)) == utype(exp)))


@dataclass
class _Ctx:
    model: HFModel
    writers: list
    tp: int
    st_dtype: str
    allow_nonfinite: bool
    nonfinite: dict = field(default_factory=dict)  # source tensor -> count, when allowed
    _seen: set = field(default_factory=set)  # source blocks counted: the tied lm_head / replicated norms re-read them
    bytes_written: int = 0

    def blocks(self, pieces):
        """The pieces' source rows in blocks of at most BLOCK_BYTES as float32: (src, info, block, block key)."""
        for src, rows, cols in pieces:
            info = self.model.info(src)
            start, stop, _ = rows.indices(info.shape[0])
            step = max(1, BLOCK_BYTES // (4 * int(np.prod(info.shape[1:], dtype=np.int64))))
            for b in range(start, stop, step):
                block = self.model.read(src, slice(b, min(b + step, stop)))
                yield src, info, (block if cols == slice(None) else block[:, cols]), (src, b, cols.start, cols.stop)

    def stream(self, pieces, rank: int, target: str, transform) -> None:
        """Write `target` on rank `rank` from its pieces, block by block, each checked for NaN/Inf."""
        for src, info, block, key in self.blocks(pieces):
            out = transform(block, info.dtype, self.st_dtype)
            self._check_finite(out, block, src, info.dtype, key)
            self.write(rank, target, out)

    def write(self, rank: int, target: str, out: np.ndarray) -> None:
        self.writers[rank].write(target, out)
        self.bytes_written += out.nbytes

    def _check_finite(self, out, block, src, src_dtype, key) -> None:
        bad = count_nonfinite(out, self.st_dtype)
        if not bad:
            return
        if self.allow_nonfinite:
            if key not in self._seen:
                self._seen.add(key)
                self.nonfinite[src] = self.nonfinite.get(src, 0) + bad
            return
        file = self.model.tensors[src][0]
        if count_nonfinite(block, src_dtype):
            raise InputError(f"{file}: tensor {src} contains NaN/Inf values",
                             fix="use an intact checkpoint, or pass --allow-nonfinite to convert anyway")
        raise InputError(f"tensor {src} overflows {self.st_dtype} ({bad} values become Inf when cast)",
                         fix="use --dtype bfloat16 (same range as float32)")


# --- TRT-LLM config.json --------------------------------------------------------------------------------------

def trtllm_config(cfg: ModelConfig, dtype: str, tp: int, quant_algo: str | None) -> dict:
    """config.json per docs/tensorrt-llm-contract.md §2 (key set of TRT PretrainedConfig.to_dict for Gemma 2), plus ours
    under EXTRA_KEY: `sliding_window` and `layer_types` (TRT's Gemma 2 config has no window; the reference runtime
    applies it)."""
    qpas = cfg.query_pre_attn_scalar
    return {
        "architecture": cfg.architecture, "dtype": dtype, "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_size": cfg.head_dim, "hidden_act": cfg.hidden_activation, "intermediate_size": cfg.intermediate_size,
        "norm_epsilon": cfg.rms_norm_eps, "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": cfg.max_position_embeddings, "rotary_base": cfg.rope_theta,
        "rotary_scaling": None,
        # TRT forces use_parallel_embedding = tp_size > 1 (passed value ignored); sharding dim 0
        "use_parallel_embedding": tp > 1, "embedding_sharding_dim": 0,
        "attn_bias": False, "mlp_bias": False, "inter_layernorms": True,
        "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
        "final_logit_softcapping": cfg.final_logit_softcapping, "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1, "cp_size": 1, "gpus_per_node": 8},
        "quantization": quantization_block(quant_algo),  # the one writer of this block (quant_block.py)
        EXTRA_KEY: {"sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types)},
    }


# --- the stage ----------------------------------------------------------------------------------------------------

def check_tp(cfg: ModelConfig, tp: int, allowed: list[int] | None = None) -> None:
    """Every split dimension must divide by tp (TRT's split_matrix_tp splits evenly; docs/tensorrt-llm-contract.md §3).
    `allowed`: the tp sizes to suggest instead of every divisor (INT4-AWQ sources: tensor_map.awq_tp_sizes)."""
    dims = {f: getattr(cfg, f) for f in TP_SPLIT_FIELDS}
    if tp < 1:
        raise ConfigError(f"--tp {tp}: must be at least 1", fix="use --tp 1 (one GPU) or more")
    for name, v in dims.items():
        if v % tp:
            ok = allowed if allowed is not None else \
                [t for t in range(1, max(dims.values()) + 1) if all(d % t == 0 for d in dims.values())][:8]
            raise ConfigError(f"--tp {tp}: {name} = {v} does not divide by {tp}",
                              fix=f"use --tp in {ok}")


def _awq_group(codec) -> int | None:
    spec = getattr(codec, "spec", None)
    return getattr(codec, "group_size", None) if spec is not None and spec.quant_algo == "W4A16_AWQ" else None


def _awq_tp_allowed(cfg: ModelConfig, codec) -> list[int] | None:
    group = _awq_group(codec)
    return None if group is None else awq_tp_sizes(cfg, group)


def _check_awq_tp(cfg: ModelConfig, tp: int, codec) -> None:
    """INT4-AWQ at a tp where TensorRT-LLM pads the groupwise layers: refused, naming the tp sizes that load
    (the same rule `trt-gemma plan` reports; tensor_map.awq_padded)."""
    group = _awq_group(codec)
    if group is None:
        return
    padded = awq_padded(cfg, tp, group)
    if padded:
        name, (o, i) = next(iter(padded.items()))
        multiple = max(AWQ_PAD_MIN, group) * tp
        raise ConfigError(f"--tp {tp}: TensorRT-LLM pads INT4-AWQ (group {group}) layers to multiples of {multiple} "
                          f"at tp {tp}, and {name} is [{o}, {i}]; this converter writes unpadded tensors, which "
                          "TensorRT-LLM would refuse to load",
                          fix=f"use --tp in {awq_tp_sizes(cfg, group)}")


def _check_options(dtype: str | None, weight_only: str | None) -> None:
    if dtype is not None and dtype not in NAME_TO_ST:
        raise ConfigError(f"--dtype {dtype!r} is not supported", fix=f"use one of {', '.join(NAME_TO_ST)}")
    if weight_only is not None and weight_only not in WEIGHT_ONLY_ALGOS:
        raise ConfigError(f"--weight-only {weight_only!r} is not supported",
                          fix=f"use one of {', '.join(WEIGHT_ONLY_ALGOS)}")


def convert_checkpoint(model: str | Path | HFModel | None, out: Path, dtype: str | None = "bfloat16", tp: int = 1,
                       weight_only: str | None = None, force: bool = False, allow_nonfinite: bool = False,
                       show_progress: bool = True) -> Path:
    """Convert an HF Gemma 2 (dir, hub id, None = embedded default, or an opened HFModel) into a TensorRT-LLM
    checkpoint at `out`. dtype None keeps the source dtype. Everything is validated before `out` is touched;
    on any error `out` is left as it was."""
    t0 = time.time()
    _check_options(dtype, weight_only)
    out = Path(out)
    # OUT before reading anything (as quantize): a local model is its own source; a hub id is not fetched yet
    if isinstance(model, HFModel):
        local = model.path
    elif model is None or Path(model).expanduser().exists():
        local = resolve_model(None if model is None else str(model))
    else:
        local = None
    check_output_target(out, force, source=local, command="convert")
    source = str(model.path) if isinstance(model, HFModel) else model
    hf = model if isinstance(model, HFModel) else HFModel.open(local or resolve_model(str(model)))
    dtype = dtype or hf.source_dtype
    if weight_only and dtype == "float32":
        raise ConfigError("--weight-only needs a 16-bit model dtype (TRT-LLM's weight-only GEMMs take fp16/bf16)",
                          fix="add --dtype bfloat16 (or float16)")
    if local is None:  # the hub id's download dir
        check_output_target(out, force, source=hf.path, command="convert")
    _check_out_not_a_hf_model(out)
    codec, jobs = codec_for(hf), plan(hf.config)
    check_tp(hf.config, tp, _awq_tp_allowed(hf.config, codec))
    if weight_only and codec is not FLOAT_CODEC:
        raise ConfigError(f"--weight-only {weight_only}: {hf.path} is already quantized",
                          fix="drop --weight-only (the checkpoint keeps its own quantization)")
    check_complete(jobs, codec, hf.tensors, tp)
    _check_awq_tp(hf.config, tp, codec)
    st = NAME_TO_ST[dtype]
    specs = target_specs(jobs, codec, tp, st)
    quant_algo = WEIGHT_ONLY_ALGOS.get(weight_only) if weight_only else None
    hasher = _InputHasher(hf.input_files())
    try:
        with atomic_output_dir(out, force) as tmp:
            ctx = _write_ranks(hf, tmp, jobs, codec, specs, tp, st, allow_nonfinite, show_progress)
            config = trtllm_config(hf.config, dtype, tp, quant_algo)
            config["quantization"].update(getattr(codec, "quantization", {}))  # a quantized source's own block
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for f in hf.tokenizer_files:
                copy_in(hf.path, f.name, tmp / f.name)  # content checked under the model dir, never a link out
            options = dict(dtype=dtype, tp=tp, weight_only=weight_only, allow_nonfinite=allow_nonfinite, force=force)
            _write_provenance(tmp, hf, source, options, ctx, hasher.result(), len(specs), t0)
    except OSError as e:  # disk full, a vanished input...: name the file; OUT is untouched (atomic_output_dir)
        if e.filename is not None and Path(e.filename).resolve() in {f.resolve() for f in hf.input_files()}:
            raise InputError(f"cannot read {e.filename}: {e.strerror}",
                             fix="the input changed during conversion; rerun") from e
        raise OutputError(f"cannot write {e.filename or out}: {e.strerror}",
                          fix="check free space and permissions") from e
    finally:
        hasher.cancel()
    return out


def _check_out_not_a_hf_model(out: Path) -> None:
    """--force replaces OUT wholesale (OUT over the source is check_output_target's refusal): OUT holding some HF
    model is most likely `convert MODEL` typed without OUT (MODEL then is OUT)."""
    if (out / "config.json").is_file() and any((out / n).is_file() for n in (SINGLE_FILE, INDEX_FILE)):
        raise OutputError(f"output {out} holds a Hugging Face model; --force will not replace it",
                          fix=f"pass both paths: `trt-gemma convert {out} OUT`, or delete {out} yourself")


def _write_ranks(hf, tmp, jobs, codec, specs, tp, st, allow_nonfinite, show_progress) -> _Ctx:
    with ExitStack() as stack:
        writers = [stack.enter_context(StreamingWriter(tmp / f"rank{r}.safetensors", specs,
                                                       {"format": "pt", "producer": "trt_gemma"}))
                   for r in range(tp)]
        ctx = _Ctx(hf, writers, tp, st, allow_nonfinite)
        with progress(disable=not show_progress) as bar:
            task = bar.add_task("converting", total=len(jobs))
            for job in jobs:
                bar.update(task, description=job.target)
                for rank in range(tp):
                    if job.entry.kind == LINEAR:
                        codec.write(ctx, job, rank)
                    else:
                        ctx.stream(job.pieces(tp, rank), rank, job.target, TRANSFORMS[job.entry.kind])
                bar.advance(task)
            bar.update(task, description="converted")
    return ctx


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("trt-gemma", "numpy", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class _InputHasher:
    """sha256 of the input files on a background thread while the conversion runs (hashlib releases the GIL on
    large buffers), so provenance costs no extra wall time on a multi-core host. Cancellable between chunks."""

    def __init__(self, files: list[Path]):
        self._stop, self._digests, self._error = threading.Event(), {}, None
        self._thread = threading.Thread(target=self._run, args=(files,), daemon=True, name="sha256-inputs")
        self._thread.start()

    def _run(self, files: list[Path]) -> None:
        try:
            for f in files:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        if self._stop.is_set():
                            return
                        h.update(chunk)
                self._digests[f] = h.hexdigest()
        except OSError as e:
            self._error = InputError(f"cannot read {e.filename} to hash it: {e.strerror}",
                                     fix="the input changed during conversion; rerun")

    def result(self) -> dict[Path, str]:
        self._thread.join()
        if self._error:
            raise self._error
        return self._digests

    def cancel(self) -> None:
        self._stop.set()


def _write_provenance(tmp: Path, hf: HFModel, source, options: dict, ctx: _Ctx, digests: dict, n_tensors: int,
                      t0: float) -> None:
    inputs = [{"file": str(f.relative_to(hf.path)), "bytes": f.stat().st_size, "sha256": digests[f]}
              for f in hf.input_files()]
    record = {
        "tool": "trt_gemma convert",
        "source": str(source) if source is not None else "default",
        "source_path": str(hf.path.resolve()),
        "inputs": inputs,
        "options": options,
        "versions": _versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 3),
        "tensors_per_rank": n_tensors,
        "bytes_written": ctx.bytes_written,
        "nonfinite_values": ctx.nonfinite,
        "outputs": sorted(p.name for p in tmp.iterdir()) + [PROVENANCE_FILE],
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2))
