"""`trt-gemma quantize [MODEL] OUT --quant int4_awq|fp8`: ModelOpt calibration -> TensorRT-LLM checkpoint (thin
wrapper of trt_gemma.quant.modelopt.quantize_checkpoint)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import click

from trt_gemma.quant.modelopt import DEVICES, GROUP_SIZES, KV_CACHES, QUANTS, quantize_checkpoint

_DEFAULTS = {k: p.default for k, p in inspect.signature(quantize_checkpoint).parameters.items()}


@click.command("quantize")
@click.argument("paths", nargs=-1, required=True, metavar="[MODEL] OUT")
@click.option("--quant", type=click.Choice(list(QUANTS)), default=_DEFAULTS["quant"],
              help="Recipe (required unless MODEL is already a ModelOpt-quantized checkpoint).")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default=None,
              help=f"INT4-AWQ group (block) size along in_features [default: {GROUP_SIZES[0]}].")
@click.option("--kv-cache", type=click.Choice(list(KV_CACHES)), default=_DEFAULTS["kv_cache"],
              help="Also quantize the KV cache (FP8, SM >= 8.9 at run time).")
@click.option("--calib-file", type=click.Path(path_type=Path), default=None,
              help="Calibration text (default: the shipped calibration set).")
@click.option("--calib-samples", type=int, default=_DEFAULTS["calib_samples"], show_default=True)
@click.option("--calib-seq-len", type=int, default=_DEFAULTS["calib_seq_len"], show_default=True)
@click.option("--device", type=click.Choice(list(DEVICES)), default=_DEFAULTS["device"], show_default=True,
              help="Where ModelOpt calibrates (auto: CUDA when torch sees one).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32", "auto"]), default="auto",
              show_default=True, help="Checkpoint dtype (scales, norms, embedding); auto keeps the source's, "
              "except float32 -> bfloat16 for int4_awq (TensorRT-LLM runs it in 16 bits only).")
@click.option("--threads", type=int, default=None,
              help="Torch threads for calibration on CPU [default: the cores available minus the current load].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only a trt-gemma output or an empty dir).")
@click.option("--allow-low-memory", is_flag=True, help="Calibrate even if available host memory looks too small.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def quantize(paths, quant, group_size, kv_cache, calib_file, calib_samples, calib_seq_len, device, dtype, threads,
             force, allow_low_memory, as_json):
    """Quantize MODEL (a local HF dir, a hub id, or the embedded model when omitted) with NVIDIA ModelOpt and write
    a TensorRT-LLM checkpoint at OUT. An already-quantized ModelOpt unified checkpoint is converted as is."""
    from trt_gemma.console import emit

    if len(paths) > 2:
        raise click.UsageError("expected [MODEL] OUT")
    model, out = (None, paths[0]) if len(paths) == 1 else paths
    group_size = None if group_size is None else int(group_size)
    path = quantize_checkpoint(model, Path(out), quant=quant, group_size=group_size, kv_cache=kv_cache,
                               calib_file=calib_file, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                               device=device, dtype=None if dtype == "auto" else dtype, force=force,
                               allow_low_memory=allow_low_memory, show_progress=not as_json, threads=threads)
    cfg = json.loads((path / "config.json").read_text())
    prov = json.loads((path / "trt_gemma_provenance.json").read_text())
    summary = {"checkpoint": str(path), "source": prov.get("source"), "dtype": cfg["dtype"],
               "quantization": cfg["quantization"], "calibration": prov.get("quantization"),
               "bytes_written": prov.get("bytes_written")}
    emit(summary, as_json, _render)


def _render(s: dict) -> None:
    from trt_gemma.console import console

    q = s["quantization"]
    kv = f" + {q['kv_cache_quant_algo']} KV" if q.get("kv_cache_quant_algo") else ""
    group = f" g{q['group_size']}" if q["quant_algo"] == "W4A16_AWQ" else ""
    console.print(f"wrote {s['checkpoint']}: {q['quant_algo']}{group}{kv}, {s['dtype']}, "
                  f"{(s['bytes_written'] or 0) / 2**20:.1f} MiB")
