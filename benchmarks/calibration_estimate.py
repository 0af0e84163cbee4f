"""Calibration time: the up-front estimate against the measured time, old formula and new, side by side.

For each recipe this calibrates the embedded model on the shipped calibration text and prints, per ModelOpt pass,
the mean seconds of one calibration forward and its ratio to the first pass's (the PASS_COST table in
trt_gemma/quant/calibration.py), then the estimates:
- old: a plain (unquantized) warm forward x a fixed multiplier (6 for int4_awq, 1.5 for fp8) x samples;
- new: the second calibration forward's time x the pass-cost-weighted number of forwards left (what the log says
  after the second forward; the bar's ETA keeps correcting it from the time measured so far).

    python benchmarks/calibration_estimate.py [--samples 8] [--seq-len 128] [--threads N]
"""
from __future__ import annotations

import argparse
import time

OLD_MULTIPLIER = {"int4_awq": 6.0, "fp8": 1.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="default: trt_gemma's choice")
    ap.add_argument("--quant", nargs="+", default=["int4_awq", "fp8"])
    args = ap.parse_args()

    import torch

    from trt_gemma.assets import calib_text_path, default_model_dir
    from trt_gemma.quant.calibration import PASS_COST, choose_threads, seconds_left
    from trt_gemma.quant.modelopt import _quiet, calibrate, calibration_batches, load_model

    with _quiet():  # imported once here, so its import time is not counted as calibration
        import modelopt.torch.quantization  # noqa: F401

    model_dir = default_model_dir()
    batches = calibration_batches(model_dir, calib_text_path(), args.samples, args.seq_len)
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"embedded model, {len(batches)} samples x {args.seq_len} tokens, {why}")
    print(f"{'quant':9} {'pass':>4} {'mean s/fwd':>10} {'cost vs pass 1':>14} {'table':>6}")
    rows = []
    for quant in args.quant:
        model = load_model(model_dir, "cpu")
        with torch.no_grad():
            x = torch.tensor([batches[0]])
            model(x)
            t = time.perf_counter()
            model(x)
            plain = time.perf_counter() - t
        timings: list = []
        t0 = time.perf_counter()
        calibrate(model, quant, batches, show_progress=False, log=lambda m: None, threads=threads, timings=timings)
        actual = time.perf_counter() - t0
        passes = sorted({p for p, _ in timings})
        means = [sum(s for p, s in timings if p == q) / sum(1 for p, _ in timings if p == q) for q in passes]
        for q, m in zip(passes, means):
            table = PASS_COST[quant][q] if q < len(PASS_COST[quant]) else float("nan")
            print(f"{quant:9} {q + 1:>4} {m:>10.4f} {m / means[0]:>14.2f} {table:>6.2f}")
        first = timings[0][1]
        k = min(2, len(timings))  # the estimate is logged after the second forward
        new = sum(t for _, t in timings[:k]) + seconds_left(timings[:k], list(PASS_COST[quant]), len(batches))
        old = OLD_MULTIPLIER[quant] * plain * len(batches)
        rows.append((quant, actual, old, new, first / means[0]))
    print(f"\n{'quant':9} {'actual s':>9} {'old est.':>9} {'old/actual':>10} {'new est.':>9} {'new/actual':>10} "
          f"{'1st fwd / pass-1 mean':>21}")
    for quant, actual, old, new, f in rows:
        print(f"{quant:9} {actual:>9.1f} {old:>9.1f} {old / actual:>10.2f} {new:>9.1f} {new / actual:>10.2f} "
              f"{f:>21.2f}")


if __name__ == "__main__":
    main()
