"""`trt-gemma export-onnx [CKPT] OUT`: a checkpoint -> standard-operator ONNX graph (thin wrapper of export_onnx)."""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import click

from trt_gemma.errors import DependencyError

# Defaults are the stage's own; trt_gemma.onnx.export imports onnx lazily, so --help works without the extra.
from trt_gemma.onnx.export import ACTIVATIONS, KV_CACHE_LAYOUTS, LM_HEAD_CHOICES, LOGITS_CHOICES, export_onnx as run

_DEFAULTS = {k: p.default for k, p in inspect.signature(run).parameters.items()}


@click.command("export-onnx")
@click.argument("paths", nargs=-1, required=True, metavar="[CKPT] OUT")
@click.option("--max-seq-len", type=click.IntRange(1), default=None,
              help="Longest prompt + generation the graph serves (rotary table size) [default: the model's].")
@click.option("--opset", type=int, default=_DEFAULTS["opset"], show_default=True,
              help="ONNX opset (INT4 needs >= 21; from 23 RMSNorm and RoPE are one node each: "
                   "RMSNormalization, RotaryEmbedding).")
@click.option("--lm-head", type=click.Choice(LM_HEAD_CHOICES), default=_DEFAULTS["lm_head"], show_default=True,
              help="Quantize the (tied) lm_head: int8 per vocab row or int4 in blocks of 128 (docs/onnx.md).")
@click.option("--kv-cache", type=click.Choice(KV_CACHE_LAYOUTS), default=_DEFAULTS["kv_cache"], show_default=True,
              help="concat: standard past/present (present = past ++ new); inplace: fixed-capacity buffers the new "
                   "rows are scattered into, bound as past and present at once; pool: batched steps over a KV pool "
                   "the runtime owns, per-row positions, new rows, ArgMax and TopK out (the onnxruntime backend's "
                   "and the TensorRT route's; docs/onnx.md).")
@click.option("--logits", type=click.Choice(LOGITS_CHOICES), default=_DEFAULTS["logits"], show_default=True,
              help="last: logits of the last position only, [batch, 1, vocab] (generation; norm and lm_head run on "
                   "one row); all: every position (perplexity / eval).")
@click.option("--activations", type=click.Choice(ACTIVATIONS), default=_DEFAULTS["activations"], show_default=True,
              help="The dtype the graph computes in (weights keep theirs): float32 for CPU onnxruntime; float16 / "
                   "bfloat16 for TensorRT (the route exports with the recipe's dtype).")
@click.option("--top-k", type=click.IntRange(1), default=_DEFAULTS["top_k"], show_default=True,
              help="Candidates per row the pool layout returns (TopK ids and log-probabilities): the host samples "
                   "from them for requests with top_k up to this.")
@click.option("--vocab-mask", is_flag=True,
              help="Pool layout: add a per-row bool [batch, vocab] input of allowed tokens, applied before ArgMax "
                   "and TopK (constrained decoding, logit bias).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export_onnx(paths, max_seq_len, opset, lm_head, kv_cache, logits, activations, top_k, vocab_mask, force, as_json):
    """Export CKPT (a `trt-gemma convert`/`quantize` checkpoint, a bundle, an HF dir or hub id; omitted: the
    embedded model) to OUT/model.onnx + model.onnx.data for onnxruntime and the TensorRT(-RTX) ONNX parsers."""
    from trt_gemma.runtime.backends import reference_checkpoint
    from trt_gemma.console import emit
    from trt_gemma.checkpoint.hf import resolve_model

    if len(paths) > 2:
        raise click.UsageError(f"expected [CKPT] OUT, got {len(paths)} paths")
    if importlib.util.find_spec("onnx") is None:
        raise DependencyError("export-onnx needs the onnx package", fix="pip install 'trt-gemma[onnx]'")
    spec, out = (None, Path(paths[0])) if len(paths) == 1 else (paths[0], Path(paths[1]))
    ckpt = reference_checkpoint(resolve_model(spec))
    summary = run(ckpt, out, max_seq_len=max_seq_len, opset=opset, lm_head=lm_head, kv_cache=kv_cache, logits=logits,
                  activations=activations, force=force, show_progress=not as_json, top_k=top_k, vocab_mask=vocab_mask)
    emit(summary, as_json, _render)


def _render(s: dict) -> None:
    from trt_gemma.console import console

    m = s["model"]
    quant = ", ".join(q for q in (m["quant_algo"], m["kv_cache_quant_algo"] and f"KV {m['kv_cache_quant_algo']}",
                                  m["lm_head"] != "none" and f"lm_head {m['lm_head']}") if q) or "float"
    console.print(f"wrote {s['path']}: opset {s['opset']}, {s['nodes']} nodes, {m['dtype']} ({quant}), "
                  f"{m['activation_dtype']} activations, {m['logits']}-position logits, "
                  f"max_seq_len {m['max_seq_len']}, {s['external_bytes'] / 2**20:.1f} MiB of weights in "
                  f"{s['wall_s']:.1f} s (peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB)")
