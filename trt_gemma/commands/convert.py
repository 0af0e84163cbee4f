"""`trt-gemma convert MODEL OUT`: Hugging Face Gemma 2 -> TensorRT-LLM checkpoint (thin wrapper of convert_checkpoint)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import click

from trt_gemma.checkpoint.dtypes import NAME_TO_ST

# Defaults come from the stage function's signature, never retyped here. Imported lazily would need the module
# anyway to build --help, and trt_gemma.checkpoint.convert imports only numpy/rich.
from trt_gemma.checkpoint.convert import PROVENANCE_FILE, WEIGHT_ONLY_ALGOS, convert_checkpoint

_DEFAULTS = {k: p.default for k, p in inspect.signature(convert_checkpoint).parameters.items()}


@click.command("convert")
@click.argument("paths", nargs=-1, required=True, metavar="[MODEL] OUT")
@click.option("--dtype", type=click.Choice([*NAME_TO_ST, "auto"]), default=_DEFAULTS["dtype"], show_default=True,
              help="Checkpoint dtype; auto keeps the source's.")
@click.option("--tp", type=int, default=_DEFAULTS["tp"], show_default=True, help="Tensor-parallel ranks (GPUs).")
@click.option("--weight-only", type=click.Choice(list(WEIGHT_ONLY_ALGOS)), default=_DEFAULTS["weight_only"],
              help="Mark for INT8/INT4 weight-only quantization (W8A16/W4A16), done by TensorRT-LLM at build.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-nonfinite", is_flag=True, help="Convert even if weights contain NaN/Inf (counted, not fixed).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def convert(paths, dtype, tp, weight_only, force, allow_nonfinite, as_json):
    """Convert MODEL (a local HF dir, a hub id; omitted or `default`: the embedded model) into a TensorRT-LLM
    checkpoint at OUT (config.json, rank*.safetensors, tokenizer, provenance)."""
    from trt_gemma.console import emit

    if len(paths) > 2:
        raise click.UsageError(f"expected [MODEL] OUT, got {len(paths)} paths")
    model, out = (None, Path(paths[0])) if len(paths) == 1 else (paths[0], Path(paths[1]))
    path = convert_checkpoint(model, out, dtype=None if dtype == "auto" else dtype, tp=tp, weight_only=weight_only,
                              force=force, allow_nonfinite=allow_nonfinite, show_progress=True)
    prov = json.loads((path / PROVENANCE_FILE).read_text())
    cfg = json.loads((path / "config.json").read_text())
    summary = {"checkpoint": str(path), "source": prov["source"], "dtype": cfg["dtype"], "tp": tp,
               "quant_algo": cfg["quantization"]["quant_algo"], "tensors_per_rank": prov["tensors_per_rank"],
               "bytes_written": prov["bytes_written"], "seconds": prov["seconds"],
               "nonfinite_values": prov["nonfinite_values"], "files": prov["outputs"]}
    emit(summary, as_json, _render)


def _render(s: dict) -> None:
    from trt_gemma.console import console

    algo = f", {s['quant_algo']}" if s["quant_algo"] else ""
    console.print(f"wrote {s['checkpoint']}: {s['dtype']}{algo}, tp={s['tp']}, {s['tensors_per_rank']} tensors per "
                  f"rank, {s['bytes_written'] / 2**20:.1f} MiB in {s['seconds']:.1f} s")
    if s["nonfinite_values"]:
        console.print(f"[yellow]warning:[/] NaN/Inf kept in {len(s['nonfinite_values'])} tensor(s) (--allow-nonfinite)")
