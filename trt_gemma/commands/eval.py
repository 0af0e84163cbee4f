"""`trt-gemma eval CHECKPOINT... [--baseline CKPT] [--text FILE] [--json]`: quantization quality table (thin wrapper
of trt_gemma.eval.evaluate)."""
from __future__ import annotations

import inspect
from pathlib import Path

import click

from trt_gemma.eval import evaluate

_DEFAULTS = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()}


@click.command("eval")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Unquantized checkpoint to compare against (default: among several CHECKPOINTs the first "
                   "unquantized one, else the source model named in a checkpoint's provenance, in float32).")
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (default: the shipped held-out text).")
@click.option("--max-tokens", type=int, default=_DEFAULTS["max_tokens"], show_default=True,
              help="Tokens of the text to score.")
@click.option("--allow-quantized-baseline", is_flag=True,
              help="Accept a quantized --baseline (e.g. FP8 vs INT4-AWQ); by default it is refused.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_(checkpoints, baseline, text_file, max_tokens, allow_quantized_baseline, as_json):
    """Perplexity, top-1 agreement and mean KL divergence of each CHECKPOINT against the unquantized model, all run
    by the numpy reference runtime (which emulates each checkpoint's quantization). CHECKPOINT may also be a
    `trt-gemma build` bundle (its checkpoint/) or an HF Gemma 2 dir (converted once into the cache)."""
    from trt_gemma.console import emit

    report = evaluate(list(checkpoints), baseline=baseline, text_file=text_file, max_tokens=max_tokens,
                      show_progress=not as_json, allow_quantized_baseline=allow_quantized_baseline)
    emit(report.to_dict(), as_json, lambda _: _render(report))


def _render(report) -> None:
    from trt_gemma.console import console

    console.print(report.to_markdown(), highlight=False, markup=False, soft_wrap=True)
