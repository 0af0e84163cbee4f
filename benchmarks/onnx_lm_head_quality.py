"""What `export-onnx --lm-head int8|int4` costs in quality, with eval.py's metrics on onnxruntime logits.

    python benchmarks/onnx_lm_head_quality.py [--max-tokens 1024] [--accuracy-level 0]

The embedded model (float32, and INT4 weight-only) is exported with the lm_head as stored and quantized; every graph
scores the embedded model's held-out eval text (trt_gemma/assets, never seen in training) in eval.py's windows, and
perplexity, top-1 agreement and mean KL are taken against the float32 graph with the float lm_head (eval.py's
definitions: trt_gemma/eval.py). Prints a markdown table (docs/onnx.md quotes it).
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np


def scores(onnx_dir: Path, windows, accuracy_level: int):
    from trt_gemma.runtime.onnxruntime import OrtModel
    from trt_gemma.eval import _log_softmax

    model = OrtModel(onnx_dir, accuracy_level=accuracy_level, threads=1)
    return [(w[1:], _log_softmax(model.forward(w)[:-1])) for w in windows]


def main() -> None:
    from trt_gemma.assets import eval_text_path
    from trt_gemma.checkpoint.convert import convert_checkpoint
    from trt_gemma.eval import MAX_CONTEXT, _windows
    from trt_gemma.onnx.export import export_onnx
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--accuracy-level", type=int, default=0, help="onnxruntime MatMulNBits accuracy level")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lm_head_quality-") as tmp:
        work = Path(tmp)
        cks = {"float32": convert_checkpoint(None, work / "fp32", dtype="float32", show_progress=False),
               "int4 weight-only": convert_checkpoint(None, work / "w4", dtype="bfloat16", weight_only="int4",
                                                      show_progress=False)}
        tok = GemmaTokenizer.from_dir(cks["float32"])
        ids = tok.encode(eval_text_path().read_text(), add_bos=False)[:args.max_tokens]
        windows = _windows(ids, tok.bos_id, MAX_CONTEXT)
        rows = []
        for body, ck in cks.items():
            for head in ("none", "int8", "int4"):
                out = work / f"{body}-{head}".replace(" ", "_")
                s = export_onnx(ck, out, lm_head=head, logits="all", show_progress=False)
                rows.append((body, head, s["external_bytes"], scores(out, windows, args.accuracy_level)))
    base = rows[0][3]
    print(f"{sum(len(t) for t, _ in base)} predicted tokens of eval.txt; baseline: float32 graph, float lm_head; "
          f"accuracy level {args.accuracy_level}\n")
    print("| body | lm_head | perplexity | Δppl | top-1 agree | mean KL | graph weights (MiB) |")
    print("|---|---|---|---|---|---|---|")
    base_ppl = None
    for body, head, nbytes, sc in rows:
        nll = np.concatenate([-lp[np.arange(len(t)), t] for t, lp in sc])
        agree = np.concatenate([lp.argmax(-1) == lb.argmax(-1) for (_, lp), (_, lb) in zip(sc, base)])
        kl = np.concatenate([(np.exp(lb) * (lb - lp)).sum(-1) for (_, lp), (_, lb) in zip(sc, base)])
        ppl = math.exp(nll.mean())
        base_ppl = base_ppl or ppl
        print(f"| {body} | {head} | {ppl:.4f} | {100 * (ppl / base_ppl - 1):+.2f}% | {100 * agree.mean():.2f}% | "
              f"{kl.mean():.5f} | {nbytes / 2**20:.2f} |")


if __name__ == "__main__":
    main()
