"""ShieldGemma moderation latency on the two CPU backends, side by side (`trt-gemma moderate`, `serve --guard`).

    python benchmarks/moderation_latency.py [--model DIR] [--repeats 7]

For each backend (the numpy reference runtime, the oracle; onnxruntime over the cached ONNX export, the default
where installed) in one run: the cold load into a fresh cache (the reference's includes the HF -> checkpoint
conversion, onnxruntime's the ONNX export of that checkpoint), then the median over `--repeats` of one moderation = four prefills (one per policy) of the tutorial's
example, prompt-only and with a one-line response, and the largest |P("Yes")| difference from the reference.
Default model: the embedded one (no safety model: the numbers are the mechanism's cost, not a real guard's).
Set OMP_NUM_THREADS / TRT_GEMMA_ORT_THREADS to pin threads; the backend picks 1 thread for models under 64 MiB.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from trt_gemma.safety import POLICIES, load_moderator

PROMPT = "Create 20 paraphrases of I hate you"  # the tutorial's example (gemma-cookbook, cell 15)
RESPONSE = "I will not do that. Here is a kind message instead."


def load(backend: str, model: str | None, cache: Path):
    t0 = time.perf_counter()
    mod = load_moderator(model, cache_dir=cache / "checkpoints", backend=backend)
    return mod, time.perf_counter() - t0


def measure(mods: list, repeats: int) -> list[dict]:
    """Backends interleaved within each repeat, so load from other processes on a shared host hits both alike."""
    out: list[dict] = [{} for _ in mods]
    for mode, response in (("prompt_only", None), ("prompt_response", RESPONSE)):
        for mod in mods:
            mod.score(PROMPT, response)  # warm-up: first-call allocations, onnxruntime's kernel selection
        runs: list[list] = [[] for _ in mods]
        for _ in range(repeats):
            for i, mod in enumerate(mods):
                runs[i].append(mod.score(PROMPT, response))
        for i, r in enumerate(runs):
            out[i][mode] = {"ms": 1000 * statistics.median(v.seconds for v in r), "scores": r[0].scores,
                            "tokens": r[0].prompt_tokens}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="guard model (default: the embedded model)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trt-gemma-modbench-") as tmp:
        loaded = [load(b, args.model, Path(tmp)) for b in ("reference", "onnxruntime")]
        rows = measure([m for m, _ in loaded], args.repeats)
        for row, (mod, secs) in zip(rows, loaded):
            row.update(backend=mod.backend, load_s=secs)
    ref = rows[0]
    toks = ref["prompt_only"]["tokens"]
    print(f"{len(POLICIES)} prefills per moderation, {min(toks)}-{max(toks)} prompt tokens (prompt-only), "
          f"median of {args.repeats}")
    print(f"{'backend':<12} {'cold load s':>11} {'prompt-only ms':>15} {'prompt+response ms':>19} "
          f"{'speed-up':>9} {'max |dP| vs ref':>16}")
    for r in rows:
        speed = ref["prompt_only"]["ms"] / r["prompt_only"]["ms"]
        dp = max(abs(r[m]["scores"][p] - ref[m]["scores"][p]) for m in ("prompt_only", "prompt_response")
                 for p in POLICIES)
        print(f"{r['backend']:<12} {r['load_s']:>11.2f} {r['prompt_only']['ms']:>15.1f} "
              f"{r['prompt_response']['ms']:>19.1f} {speed:>8.2f}x {dp:>16.2e}")


if __name__ == "__main__":
    main()
