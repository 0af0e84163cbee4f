"""INT4-AWQ and FP8 (+ FP8 KV cache) through NVIDIA ModelOpt, written as a TensorRT-LLM checkpoint.

ModelOpt is the algorithm; this stage runs it anywhere (CUDA when present, else CPU) and writes its result in
TensorRT-LLM's layout, which ModelOpt itself can only do for Gemma 2 with tensorrt_llm installed. The flow:

1. resolve MODEL; an already-quantized ModelOpt unified-HF dir (hf_quant_config.json / quantization_config) skips
   straight to step 6 (no recalibration);
2. print the host-memory estimate (ModelOpt holds the whole model, plus the copy the export mutates) and refuse a
   host with less available memory unless allow_low_memory;
3. load the HF model with transformers (float32 on CPU, the model dtype on CUDA) and the calibration text
   (N samples x L tokens of the shipped set by default, tokenized by the model's own tokenizer);
4. `mtq.quantize` with INT4_AWQ_CFG (block = group size) or FP8_DEFAULT_CFG, + FP8_KV_CFG when asked, a printed
   time estimate measured on one calibration batch;
5. `prepare_for_export`: what ModelOpt's TensorRT-LLM export does and its unified export skips for FP8 (one weight /
   activation scale per fused qkv and fc+gate group, `preprocess_linear_fusion`) and TRT-LLM's single KV scale per
   layer (max(k, v) clamped >= 1); after this the calibrated torch model computes exactly what the checkpoint holds,
   which is what the tests compare against (docs/quantization.md "the oracle");
6. `export_hf_checkpoint` on a deep copy (the export mutates the model) into a temp dir beside OUT, then the
   streaming converter (trt_gemma/checkpoint/convert.py mapping table + trt_gemma/checkpoint/codecs.py) writes OUT.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from trt_gemma.checkpoint.config import ModelConfig
from trt_gemma.errors import ConfigError, DependencyError, InputError, ResourceError
from trt_gemma.fsutil import check_output_target, marked_temp_dir, sha256_file
from trt_gemma.safe_io import read_json_object

QUANTS = {"int4_awq": ("INT4_AWQ_CFG", "W4A16_AWQ"), "fp8": ("FP8_DEFAULT_CFG", "FP8")}
KV_CACHES = {"fp8": "FP8_KV_CFG"}
GROUP_SIZES = (128, 64)
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CALIB_SAMPLES = 32   # ModelOpt's quantize.py caps AWQ calibration at 32 (docs/tensorrt-llm-contract.md §4)
DEFAULT_CALIB_SEQ_LEN = 256


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    model_bytes: int
    export_copy_bytes: int
    export_state_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.model_bytes + self.export_copy_bytes + self.export_state_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {"params": self.params, "model_bytes": self.model_bytes, "export_copy_bytes": self.export_copy_bytes,
                "export_state_bytes": self.export_state_bytes, "activation_bytes": self.activation_bytes,
                "total_bytes": self.total}


def memory_estimate(cfg: ModelConfig, device: str, calib_seq_len: int) -> MemoryEstimate:
    """Host bytes ModelOpt needs: the model (float32 on CPU; on CUDA it lives on the GPU once loaded), the deep copy
    the export mutates, the exported state dict (a packed copy, <= the float copy), and one calibration forward's
    activations (residual + MLP + attention scores + logits, float32)."""
    from trt_gemma.checkpoint.tensor_map import parameter_count

    params = parameter_count(cfg)
    on_cpu = device == "cpu"
    width = 4 if on_cpu else 2
    model = params * width if on_cpu else 0
    act = 0
    if on_cpu:
        L = calib_seq_len
        act = 4 * L * (6 * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.vocab_size
                       + 2 * cfg.num_attention_heads * L)
    return MemoryEstimate(params, model, model, params * width, act)


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def modelopt_config(quant: str, group_size: int = 128, kv_cache: str | None = None) -> dict:
    """A deep copy of ModelOpt's recipe, with the AWQ block size set and the FP8 KV entries appended."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.utils.core_utils import update_quant_cfg_with_kv_cache_quant

    cfg = copy.deepcopy(getattr(mtq, QUANTS[quant][0]))
    if quant == "int4_awq":
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = group_size
    if kv_cache:
        with _quiet():
            cfg = update_quant_cfg_with_kv_cache_quant(cfg, getattr(mtq, KV_CACHES[kv_cache])["quant_cfg"])
    return cfg


class _quiet:
    """ModelOpt (and transformers under it) print, log and warn freely (version checks, per-layer summaries,
    "Large KV activations" for the KV scale we clamp to 1 on purpose); keep stdout for our --json and stderr for our
    progress bar. Errors still raise."""

    def __init__(self, stderr: bool = False):
        self.stderr = stderr

    def __enter__(self):
        import contextlib
        import io
        import logging

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if self.stderr:
            self._stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        # transformers logs through its own stderr handler, which redirect_stderr does not reach (e.g. "`torch_dtype`
        # is deprecated" while ModelOpt's export saves the config): raise its level too
        for name in ("modelopt", "transformers"):
            logger = logging.getLogger(name)
            level, logger.level = logger.level, logging.ERROR
            self._stack.callback(logger.setLevel, level)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


# --- calibration data -------------------------------------------------------------------------------------------

def calibration_batches(tokenizer_dir: Path, text_file: Path, samples: int, seq_len: int) -> list[list[int]]:
    """`samples` windows of `seq_len` tokens: <bos> + consecutive text tokens, the text tokenized once."""
    from transformers import AutoTokenizer

    text_file = Path(text_file)
    if not text_file.is_file():
        raise InputError(f"calibration file {text_file} does not exist", fix="pass --calib-file with a text file")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"calibration file {text_file} is not UTF-8 text", fix="pass a UTF-8 text file") from e
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]  # windows are cut below
    step = seq_len - 1
    n = min(samples, len(ids) // step)
    if n < 1:
        raise InputError(f"calibration file {text_file} has {len(ids)} tokens, fewer than one sample of {seq_len}",
                         fix="use a longer --calib-file or a smaller --calib-seq-len")
    return [[tok.bos_token_id] + ids[i * step:(i + 1) * step] for i in range(n)]


# --- model, calibration, export -----------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r}", fix=f"use one of {', '.join(DEVICES)}")
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise DependencyError("--device cuda: torch sees no CUDA device", fix="use --device cpu (slower) or auto")
    return "cuda" if device == "auto" and cuda else ("cpu" if device == "auto" else device)


def load_model(model_dir: Path, device: str):
    """transformers Gemma2ForCausalLM, eval mode: float32 on CPU (ModelOpt's CPU fake-quant runs in float32),
    the checkpoint's dtype on CUDA. config.architectures is set (the export reads it)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" bar; ours is the calibration one
    torch_dtype = torch.float32 if device == "cpu" else "auto"
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(device).eval()
    model.config.architectures = [type(model).__name__]
    return model


def calibrate(model, quant: str, batches: list[list[int]], group_size: int = 128, kv_cache: str | None = None,
              show_progress: bool = True, log=print, threads: int | None = None, timings: list | None = None):
    """mtq.quantize with ModelOpt's recipe, on `threads` torch threads (None: chosen from the free cores), with a
    determinate progress bar and ETA (trt_gemma/quant/calibration.py). `timings`, when given, receives (pass, seconds)
    per calibration forward."""
    import torch

    from trt_gemma.quant.calibration import CalibrationProgress, choose_threads, torch_threads

    with _quiet():  # modelopt warns at import that it was not tested with this transformers version
        import modelopt.torch.quantization as mtq
    device = next(model.parameters()).device
    tensors = [torch.tensor([b], device=device) for b in batches]
    n_threads, why = choose_threads(threads)
    log(f"calibration: {len(batches)} samples x {len(batches[0])} tokens on {device.type}"
        + (f", {why}" if device.type == "cpu" else ""))
    with torch_threads(n_threads), CalibrationProgress(quant, len(tensors), log, show=show_progress) as bar:

        def forward_loop(m):
            for t in tensors:
                m(t)
                bar.step()

        with _quiet(), torch.no_grad():
            model = mtq.quantize(model, modelopt_config(quant, group_size, kv_cache), forward_loop)
    if timings is not None:
        timings.extend(bar.times)
    return model


def prepare_for_export(model) -> None:
    """Make the calibrated model compute what the TRT-LLM checkpoint will hold (see the module docstring, step 5).
    INT4-AWQ needs nothing here: its q/k/v and gate/up pre-quant scales are averaged and re-smoothed by the export
    itself (`requantize_resmooth_fused_llm_layers`)."""
    import torch
    from modelopt.torch.export.quant_utils import get_quantization_format, preprocess_linear_fusion

    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if get_quantization_format(attn.q_proj) == "fp8":
                preprocess_linear_fusion([attn.q_proj, attn.k_proj, attn.v_proj])
                preprocess_linear_fusion([mlp.gate_proj, mlp.up_proj])
            k_q, v_q = getattr(attn, "k_bmm_quantizer", None), getattr(attn, "v_bmm_quantizer", None)
            if k_q is not None and k_q.is_enabled and k_q.amax is not None:
                amax = torch.clamp(torch.maximum(k_q.amax.float(), v_q.amax.float()), min=FP8_MAX)
                k_q.amax, v_q.amax = amax.clone(), amax.clone()
        for module in model.modules():
            for name in ("input_quantizer", "weight_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"):
                q = getattr(module, name, None)
                if q is not None and q.is_enabled and q.num_bits == (4, 3) and q.amax is not None:
                    q.amax = snap_fp8_amax(q.amax)


FP8_MAX = 448.0


def snap_fp8_amax(amax):
    """The nearest float32 amax that survives the checkpoint's round trip: the export stores s = amax/448 and a
    reader rebuilds amax as s*448 (both float32). Moving amax by an ulp or two changes nothing in quality, but makes
    448/amax identical on both sides, so the checkpoint's activation rounding is bit-identical to ModelOpt's."""
    a = amax.float()
    for _ in range(8):
        b = (a / FP8_MAX) * FP8_MAX
        if bool((b == a).all()):
            return a
        a = b
    raise AssertionError(f"fp8 amax {amax} does not reach a fixed point of (a/448)*448")


def export_unified(model, export_dir: Path, tokenizer_dir: Path | None = None) -> Path:
    """ModelOpt's unified HF export of a deep copy (the export rewrites weights in place), plus the tokenizer files."""
    from modelopt.torch.export import export_hf_checkpoint

    from trt_gemma.checkpoint.hf import TOKENIZER_FILES

    with _quiet(stderr=True):
        export_hf_checkpoint(copy.deepcopy(model), export_dir=str(export_dir))
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, Path(export_dir) / name)
    return Path(export_dir)


# --- the stage ----------------------------------------------------------------------------------------------------

def _check_options(quant, group_size, kv_cache, cfg: ModelConfig | None) -> None:
    if quant not in QUANTS:
        raise ConfigError("--quant is missing" if quant is None else f"--quant {quant!r} is not supported",
                          fix=f"use --quant {' or '.join(QUANTS)}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size}", fix=f"use one of {', '.join(map(str, GROUP_SIZES))}")
    if kv_cache is not None and kv_cache not in KV_CACHES:
        raise ConfigError(f"--kv-cache {kv_cache!r}", fix=f"use {', '.join(KV_CACHES)} or leave it out")
    if quant == "int4_awq" and cfg is not None:
        ins = {"hidden_size": cfg.hidden_size, "q_dim": cfg.q_dim, "intermediate_size": cfg.intermediate_size}
        bad = {k: v for k, v in ins.items() if v % group_size}
        if bad:
            k, v = next(iter(bad.items()))
            raise ConfigError(f"INT4-AWQ group {group_size}: in_features {k} = {v} is not a multiple of it",
                              fix="use --group-size 64" if all(x % 64 == 0 for x in ins.values()) else
                              "use --quant fp8")


def _check_calibration(samples: int, seq_len: int, threads: int | None, cfg: ModelConfig) -> None:
    from trt_gemma.quant.calibration import check_threads

    check_threads(threads)
    if samples < 1 or seq_len < 2:
        raise ConfigError(f"--calib-samples {samples} / --calib-seq-len {seq_len}: need >= 1 sample of >= 2 tokens",
                          fix=f"use e.g. --calib-samples {DEFAULT_CALIB_SAMPLES} --calib-seq-len "
                              f"{min(DEFAULT_CALIB_SEQ_LEN, cfg.max_position_embeddings)}")
    if seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--calib-seq-len {seq_len} is longer than the model's context "
                          f"(max_position_embeddings {cfg.max_position_embeddings})",
                          fix=f"use --calib-seq-len {min(DEFAULT_CALIB_SEQ_LEN, cfg.max_position_embeddings)} "
                              f"(at most {cfg.max_position_embeddings})")


# TensorRT-LLM's groupwise INT4 (W4A16_AWQ) GEMM plugin is built for 16-bit activations only: its init() picks a
# half (later also bf16) CUTLASS runner and throws "Unsupported data type" otherwise (NVIDIA/TensorRT-LLM
# cpp/tensorrt_llm/plugins/weightOnlyGroupwiseQuantMatmulPlugin/weightOnlyGroupwiseQuantMatmulPlugin.cpp
# @027cd518e3b63809a5c5799187991e7f1164fb12). A float32 source quantized with --dtype auto would not build.
SIXTEEN_BIT_ONLY = ("W4A16_AWQ",)


def checkpoint_dtype(dtype: str | None, source_dtype: str, quant_algo: str | None, log) -> str:
    """--dtype (None = auto: the source's), except that auto maps a float32 source to bfloat16 for the formats
    TensorRT-LLM runs in 16 bits only, and says so. An explicit --dtype float32 stays (reference runtime, tests)."""
    if dtype is not None:
        return dtype
    if source_dtype == "float32" and quant_algo in SIXTEEN_BIT_ONLY:
        log(f"dtype: the source is float32 and TensorRT-LLM runs {quant_algo} in fp16/bf16 only: writing bfloat16 "
            "(--dtype float16 for fp16; --dtype float32 keeps float32 for the reference runtime only)")
        return "bfloat16"
    return source_dtype


def check_finite_weights(model, hf) -> None:
    """NaN/Inf weights make ModelOpt fail deep inside calibration ("detected nan values in amax"): name the tensor
    first, with the converter's message."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                file = hf.tensors[name][0] if name in hf.tensors else hf.path
                raise InputError(f"{file}: tensor {name} contains NaN/Inf values",
                                 fix="use an intact checkpoint (calibration cannot run on NaN/Inf weights)")


def _check_memory(est: MemoryEstimate, device: str, allow_low_memory: bool, log) -> None:
    gib = 1 << 30
    avail = available_memory()
    log(f"host memory: ModelOpt needs ~{est.total / gib:.2f} GiB on {device} ({est.params / 1e6:.1f} M params: "
        f"model {est.model_bytes / gib:.2f} + export copy {est.export_copy_bytes / gib:.2f} + exported state "
        f"{est.export_state_bytes / gib:.2f} + activations {est.activation_bytes / gib:.2f}); "
        f"{avail / gib:.2f} GiB available")
    if est.total > avail and not allow_low_memory:
        raise ResourceError(f"quantizing needs ~{est.total / gib:.2f} GiB of host memory, {avail / gib:.2f} GiB is "
                            "available (ModelOpt holds the whole model plus the copy its export mutates)",
                            fix="free memory, use a host with more RAM (or CUDA), or pass --allow-low-memory "
                                "to try anyway (swap)")


def _unquantized_source(model_dir: Path):
    """None for a float model; the ModelOpt QuantSpec for an already-quantized unified-HF dir."""
    from trt_gemma.checkpoint.codecs import read_quant_spec

    raw = read_json_object(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    if "architecture" in raw and (model_dir / "rank0.safetensors").is_file():
        algo = (raw.get("quantization") or {}).get("quant_algo")
        raise InputError(f"{model_dir} is a TensorRT-LLM checkpoint ({algo or 'unquantized'}), not a Hugging Face "
                         "model dir", fix="pass the Hugging Face model (or ModelOpt unified export) it came from; "
                                          "the checkpoint itself is ready for `trt-gemma build`")
    return read_quant_spec(model_dir, raw)


def quantize_checkpoint(model: str | Path | None, out: Path, quant: str | None = None, group_size: int | None = None,
                        kv_cache: str | None = None, calib_file: str | Path | None = None,
                        calib_samples: int = DEFAULT_CALIB_SAMPLES, calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
                        device: str = "auto", dtype: str | None = None, force: bool = False,
                        allow_low_memory: bool = False, show_progress: bool = True, log=None,
                        threads: int | None = None) -> Path:
    """Quantize MODEL (HF dir, hub id, None = embedded) with ModelOpt and write a TRT-LLM checkpoint at OUT.
    `dtype` is the checkpoint dtype (None: the source's). A ModelOpt unified-HF dir is converted without
    recalibration (quant/kv_cache, when given, must match what it declares; its group size is its own, so
    group_size must not be given). group_size None = GROUP_SIZES[0]. OUT is untouched on any error."""
    from trt_gemma.console import err_console
    from trt_gemma.checkpoint.convert import PROVENANCE_FILE, convert_checkpoint
    from trt_gemma.checkpoint.hf import HFModel, resolve_model

    log = log or (lambda msg: err_console.print(msg, highlight=False, soft_wrap=True))  # stderr, also with --json
    t0 = time.time()
    out = Path(out)
    # cheap checks first, the minute of calibration last: OUT, the model (config, every tensor header), the options
    local = Path(model) if model is not None and Path(model).is_dir() else None  # a hub id is not fetched yet
    check_output_target(out, force, source=local, command="quantize")
    model_dir = resolve_model(None if model is None else str(model))
    if local is None:
        check_output_target(out, force, source=model_dir, command="quantize")
    spec = _unquantized_source(model_dir)
    hf = HFModel.open(model_dir)  # validates config + every tensor before the long work
    if spec is not None:
        _check_prequantized(spec, quant, kv_cache, group_size, model_dir)
        log(f"{model_dir} is already quantized by ModelOpt ({spec.quant_algo}, KV {spec.kv_cache_quant_algo}); "
            "converting without recalibration")
        dtype = checkpoint_dtype(dtype, hf.source_dtype, spec.quant_algo, log)
        convert_checkpoint(model_dir, out, dtype=dtype, force=force, show_progress=show_progress)
        _add_provenance(out / PROVENANCE_FILE, {"prequantized": True, "quant_algo": spec.quant_algo,
                                                "kv_cache_quant_algo": spec.kv_cache_quant_algo})
        return out
    group_size = GROUP_SIZES[0] if group_size is None else group_size
    _check_options(quant, group_size, kv_cache, hf.config)
    _check_calibration(calib_samples, calib_seq_len, threads, hf.config)
    assert quant is not None  # _check_options refused a missing --quant
    dtype = checkpoint_dtype(dtype, hf.source_dtype, QUANTS[quant][1], log)
    dev = resolve_device(device)
    _check_memory(memory_estimate(hf.config, dev, calib_seq_len), dev, allow_low_memory, log)
    calib_path = Path(calib_file) if calib_file else _default_calib_text()
    batches = calibration_batches(model_dir, calib_path, calib_samples, calib_seq_len)
    torch_model = load_model(model_dir, dev)
    check_finite_weights(torch_model, hf)
    torch_model = calibrate(torch_model, quant, batches, group_size, kv_cache, show_progress, log, threads)
    prepare_for_export(torch_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with marked_temp_dir(out.parent, prefix=f".{out.name}.modelopt-") as tmp:
        export_unified(torch_model, Path(tmp), tokenizer_dir=model_dir)
        del torch_model
        convert_checkpoint(Path(tmp), out, dtype=dtype, force=force, show_progress=show_progress)
    _add_provenance(out / PROVENANCE_FILE, {
        "tool": "nvidia-modelopt", "modelopt_version": _modelopt_version(), "quant": quant,
        "group_size": group_size if quant == "int4_awq" else None, "kv_cache": kv_cache, "device": dev,
        "calib_file": str(calib_path), "calib_sha256": sha256_file(calib_path), "calib_samples": len(batches),
        "calib_seq_len": calib_seq_len, "seconds": round(time.time() - t0, 2)}, source=model_dir, model=model)
    return out


def _check_prequantized(spec, quant, kv_cache, group_size, model_dir: Path) -> None:
    want = QUANTS[quant][1] if quant in QUANTS else None
    if quant is not None and want != spec.quant_algo:
        raise ConfigError(f"{model_dir} is already quantized as {spec.quant_algo}; --quant {quant} cannot "
                          "re-quantize it", fix="drop --quant, or start from the unquantized model")
    if kv_cache is not None and spec.kv_cache_quant_algo != kv_cache.upper():
        raise ConfigError(f"{model_dir} has KV cache quantization {spec.kv_cache_quant_algo}, not {kv_cache}",
                          fix="drop --kv-cache, or start from the unquantized model")
    if group_size is not None:
        raise ConfigError(f"{model_dir} is already quantized: its group size is fixed by its scales, --group-size "
                          f"{group_size} cannot change it", fix="drop --group-size, or start from the unquantized model")


def _default_calib_text() -> Path:
    from trt_gemma.assets import calib_text_path

    return Path(calib_text_path())


def _modelopt_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-modelopt")
    except PackageNotFoundError:
        return None


def _add_provenance(path: Path, quantization: dict, source: Path | None = None, model=None) -> None:
    """The converter's record names the temp export as its source; point it at the real model and add our step."""
    from trt_gemma.checkpoint.hf import HFModel

    record = json.loads(path.read_text())
    record["quantization"] = quantization
    if source is not None:
        hf = HFModel.open(source)
        record["tool"] = "trt_gemma quantize"
        record["source"] = str(model) if model is not None else "default"
        record["source_path"] = str(Path(source).resolve())
        record["unified_export_inputs"] = record.get("inputs")
        record["inputs"] = [{"file": str(f.relative_to(hf.path)), "bytes": f.stat().st_size,
                             "sha256": sha256_file(f)} for f in hf.input_files()]
    path.write_text(json.dumps(record, indent=2))
