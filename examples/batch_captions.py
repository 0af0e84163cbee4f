"""Caption many scene descriptions at once: prompts through `Model.generate` from a thread pool, with
`max_concurrency` generations sharing the model (a camera pipeline's batch job, an offline labelling run).

    python examples/batch_captions.py [MODEL] [--concurrency 2] [--max-tokens 24] < scenes.txt

One scene per stdin line (built-in examples when stdin is a terminal). Prints one JSON line per scene, in input
order ({"scene", "caption", "tokens", "finish_reason", "seconds"}), then the totals on stderr. More threads than
`--concurrency` just wait their turn in the model's queue, so the pool can be as large as the batch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import trt_gemma

SCENES = ["a robot arm lifts a red cube from a conveyor belt", "two people wait at a bus stop in the rain",
          "a delivery drone lands on a rooftop at dusk", "a cat sleeps on a warm laptop keyboard"]


def caption(model: trt_gemma.Model, scene: str, max_tokens: int) -> dict[str, object]:
    prompt = f"The picture shows {scene}, and"
    c = model.generate(prompt, max_tokens=max_tokens, stop=["."])  # one sentence
    return {"scene": scene, "caption": " ".join(c.text.split()), "tokens": c.usage.completion_tokens,
            "finish_reason": c.finish_reason, "seconds": round(c.timings.total_s, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--concurrency", type=int, default=2, help="generations at once (the model's max_concurrency)")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    scenes = SCENES if sys.stdin.isatty() else [line.strip() for line in sys.stdin if line.strip()]
    t0 = time.perf_counter()
    with trt_gemma.load(args.model, max_concurrency=args.concurrency) as model, \
            ThreadPoolExecutor(max_workers=max(1, len(scenes))) as pool:
        results = list(pool.map(lambda s: caption(model, s, args.max_tokens), scenes))
        mem = model.telemetry()["memory_bytes"]
    wall = time.perf_counter() - t0
    for r in results:
        print(json.dumps(r))
    tokens = sum(int(str(r["tokens"])) for r in results)
    print(f"{len(results)} captions, {tokens} tokens in {wall:.2f} s ({tokens / wall:.1f} tok/s overall, "
          f"{args.concurrency} at once); host RSS {mem['host_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
