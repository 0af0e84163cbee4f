"""Peak memory of the real TensorRT-RTX builder against the graph's weight bytes: the calibration of
trt_gemma.engine.plan.build_memory (what `plan` predicts for an on-device engine build).

    python benchmarks/build_memory.py [--sizes small,medium] [--activations float16] [--workdir DIR] [--keep]

For each size a synthetic Gemma-2-2B-shaped INT4-AWQ g128 checkpoint with fewer layers / a smaller vocabulary
(benchmarks/cpu_decode.write_synthetic_awq, random weights) is exported as the TensorRT route exports it (opset 21,
last-position logits, int4 lm_head, the given activation dtype) and built by tensorrt_rtx for SM 8.9 in a child
process under /usr/bin/time, whose maximum RSS is the builder's peak (parse + build + serialize; the ONNX weights
are read by the parser). Prints weights, engine and peak RSS, and the model's prediction beside each.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# (layers, vocab) on the gemma-2-2b shape: ~0.3 GB and ~1.2 GB of graph weights
SIZES = {"small": (2, 32768), "medium": (8, 131072), "2b": (26, 256000)}
BUILD = """
import sys
from trt_gemma.engine.build import build_engine
from trt_gemma.engine.profiles import Limits
from trt_gemma.targets import TARGETS
build_engine(sys.argv[1], sys.argv[2], TARGETS["rtx-4090"], Limits(1, 128, 512), force=True)
"""


def graph_bytes(onnx_dir: Path) -> int:
    return sum(p.stat().st_size for p in onnx_dir.iterdir() if p.name.startswith("model.onnx"))


def one(work: Path, size: str, activations: str) -> dict:
    from cpu_decode import write_synthetic_awq

    from trt_gemma.checkpoint.config import PRESETS

    layers, vocab = SIZES[size]
    cfg = dict(PRESETS["gemma-2-2b"], model_type="gemma2", num_hidden_layers=layers, vocab_size=vocab)
    ckpt, onnx_dir, eng = work / f"{size}-ckpt", work / f"{size}-onnx-{activations}", work / f"{size}-engine"
    if not (ckpt / "config.json").is_file():
        write_synthetic_awq(ckpt, cfg)
    r = subprocess.run([sys.executable, "-m", "trt_gemma", "export-onnx", str(ckpt), str(onnx_dir), "--force",
                        "--json", "--opset", "21", "--logits", "last", "--lm-head", "int4", "--activations",
                        activations, "--max-seq-len", "512"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"export failed:\n{r.stderr[-2000:]}")
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", BUILD, str(onnx_dir / "model.onnx"),
                        str(eng)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"build failed:\n{r.stderr[-2000:]}")
    peak = int(r.stderr.strip().splitlines()[-1]) * 1024
    return {"size": size, "activations": activations, "weights_bytes": graph_bytes(onnx_dir),
            "engine_bytes": (eng / "model.engine").stat().st_size, "peak_rss_bytes": peak,
            "build_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from trt_gemma.engine.plan import build_memory

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--activations", default="float16", choices=["float16", "float32"])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="build_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for size in args.sizes.split(","):
            row = one(work, size, args.activations)
            row["predicted_peak_bytes"] = build_memory(row["weights_bytes"], args.activations)["peak_bytes"]
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
