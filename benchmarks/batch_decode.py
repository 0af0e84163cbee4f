"""Batched decoding (the step loop over a KV pool) against per-request threads, side by side in one run.

    python benchmarks/batch_decode.py [--tokens 128] [--streams 1,2,4,8] [--2b] [--tokens-2b 32] [--skip-server]
                                      [--workdir DIR]

Rows (each layout in its own child process, so memory and threads are its own):
  aggregate decode tok/s at 1 / 2 / 4 / 8 concurrent greedy streams (32-token prompts, `--tokens` each; through the
  API the tokens after each stream's first over the time from the last first token to the last token, so the
  compute-bound prefill is left out; through the server the whole request), through the
  Python API (trt_gemma.api.Model) and through the server (`trt-gemma serve`, /v1/completions, one client thread
  per stream), for
    step loop:            a `--kv-cache pool` export on the onnxruntime backend (runtime/steploop.py)
    per-request threads:  a `--kv-cache inplace` export, each request its own stream() on its own thread (as before)
  on the embedded model and, with --2b, on a synthetic Gemma-2-2B-shaped INT4-AWQ g128 checkpoint with an int4
  lm_head (API only; written as benchmarks/cpu_decode.py writes it, ~2.2 GB, minutes);
  the p99 gap between tokens of 3 running streams while a 2,000-token prompt is admitted, chunked (--prefill-chunk
  32 and 256) and not, against the idle step time (the embedded model with its context raised to 4096: timing only);
  KV rows the step loop bound per step against the rows' exact past lengths (the bucketed minimum's overhead);
  the bandwidth roofline (weights + KV bytes per step) and the compute roofline (matmul FLOPs per step against
  this host's measured float32 matmul throughput).
Goals (issue 23): embedded 8 streams >= 4x 1 stream; 2B shape 4 streams >= 1.8x, 8 streams >= 1.95x its 1 stream;
1 stream within 3% of per-request threads; p99 gap during a long prefill <= 2x the idle step time (chunked).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_decode import bandwidth_gbs, bytes_read_per_token, export, write_synthetic_awq  # noqa: E402

PROMPT = 32
LAYOUTS = {"step loop": ("--kv-cache", "pool"), "per-request threads": ("--kv-cache", "inplace")}


def prompts(n: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[2] + rng.integers(10, min(vocab, 4000), PROMPT - 1).tolist() for _ in range(n)]


def concurrent(fn, n: int) -> float:
    """Wall seconds for n threads each running fn(i)."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


# ---- child processes -----------------------------------------------------------------------------------------------

def child_api(onnx_dir: Path, streams: list[int], tokens: int) -> dict:
    from trt_gemma.api import Model
    from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend.load(onnx_dir, slots=max(streams))
    model = Model(backend, max_concurrency=max(streams))
    ids = prompts(max(streams), backend.info.vocab_size)
    model.generate(ids[0], max_tokens=4, ignore_eos=True)  # warm-up: first-run allocations
    out = {}
    for n in streams:
        out[n] = statistics.median(decode_rate(model, ids, n, tokens) for _ in range(3 if n == 1 else 1))
    loop = getattr(backend, "loop", None)
    if loop is not None and loop.kv_rows_needed:
        out["kv_read_over_needed"] = loop.kv_rows_read / loop.kv_rows_needed
        out["steps"] = loop.steps
    return out


def decode_rate(model, ids: list[list[int]], n: int, tokens: int) -> float:
    """Aggregate decode tok/s of n concurrent streams: the tokens after each stream's first, over the time from the
    last first token (every prompt read) to the last token (prefill, which is compute-bound, left out)."""
    first, last = [0.0] * n, [0.0] * n

    def run(i):
        for k, _ in enumerate(model.stream(ids[i], max_tokens=tokens, ignore_eos=True)):
            last[i] = time.perf_counter()
            if k == 0:
                first[i] = last[i]

    concurrent(run, n)
    return n * (tokens - 1) / (max(last) - max(first))


def child_lone(pool_dir: Path, inplace_dir: Path, tokens: int, rounds: int = 9) -> dict:
    """One stream through the API, step loop and per-request generation loaded side by side and run alternately
    (`rounds` each): the ratio of medians, robust to a host whose load drifts."""
    from trt_gemma.api import Model
    from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend

    models = {name: Model(OnnxRuntimeBackend.load(d, slots=8), max_concurrency=8)
              for name, d in (("step loop", pool_dir), ("per-request threads", inplace_dir))}
    ids = prompts(1, 4000)[0]
    rates: dict = {name: [] for name in models}
    for r in range(rounds + 1):
        for name, m in models.items():
            rate = decode_rate(m, [ids], 1, tokens)
            if r:  # round 0 warms up
                rates[name].append(rate)
    return {name: statistics.median(v) for name, v in rates.items()}


def child_gap(onnx_dir: Path, chunk: int, tokens: int) -> dict:
    """3 streams decode; after 30 tokens each, a 2,000-token prompt arrives: their token gaps before and during it."""
    from trt_gemma.runtime.base import GenerationParams
    from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend.load(onnx_dir, slots=4, prefill_chunk=chunk)
    ids = prompts(3, backend.info.vocab_size)
    stamps: list[list[float]] = [[] for _ in range(3)]
    arrived, first = [0.0], [0.0]

    def run(i):
        for _ in backend.stream(ids[i], GenerationParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)):
            stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 30:
        time.sleep(0.001)
    arrived[0] = time.perf_counter()
    long = [2] + np.random.default_rng(1).integers(10, 4000, 1999).tolist()
    next(iter(backend.stream(long, GenerationParams(max_tokens=1, temperature=0.0, ignore_eos=True))))
    first[0] = time.perf_counter()
    for t in threads:
        t.join()
    idle, during = [], []
    for s in stamps:
        for a, b in zip(s, s[1:]):
            (idle if b < arrived[0] else during if a < first[0] else []).append(b - a)
    return {"idle_ms": 1e3 * statistics.median(idle[5:]), "p99_ms": 1e3 * float(np.percentile(during, 99)),
            "prefill_s": first[0] - arrived[0]}


def child_server(onnx_dir: Path, streams: list[int], tokens: int) -> dict:
    import httpx

    from serve_overhead import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trt_gemma", "serve", str(onnx_dir), "--port", str(port),
                             "--max-concurrency", str(max(streams)), "--model-name", "bench",
                             "--backend", "onnxruntime"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        ids = prompts(max(streams), 4000)

        def ask(i):
            r = httpx.post(url + "/v1/completions", timeout=600, json={
                "model": "bench", "prompt": ids[i], "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == tokens, r.text

        ask(0)  # warm-up
        return {n: n * tokens / concurrent(ask, n) for n in streams}
    finally:
        proc.terminate()
        proc.wait(30)


def child(kind: str, path: str, streams: str, tokens: int, chunk: int) -> None:
    ns = [int(x) for x in streams.split(",")]
    fn = {"api": lambda: child_api(Path(path), ns, tokens), "server": lambda: child_server(Path(path), ns, tokens),
          "lone": lambda: child_lone(*(Path(p) for p in path.split(os.pathsep)), tokens),
          "gap": lambda: child_gap(Path(path), chunk, tokens)}[kind]
    print(json.dumps(fn()))


def run_child(kind: str, path: Path, streams: str, tokens: int, chunk: int = 256) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", kind, str(path), streams, str(tokens), str(chunk)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    if r.returncode:
        raise SystemExit(f"{kind} on {path} failed:\n{r.stderr[-3000:]}")
    return {(int(k) if k.isdigit() else k): v for k, v in json.loads(r.stdout.splitlines()[-1]).items()}


# ---- rooflines -------------------------------------------------------------------------------------------------

def matmul_gflops() -> float:
    """This host's float32 matmul throughput (numpy's BLAS on every core), the compute roof of a multi-row step."""
    a, b = np.ones((256, 2304), np.float32), np.ones((2304, 9216), np.float32)
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_row(onnx_dir: Path) -> float:
    """2 x the MatMul weight elements one row's step multiplies (the lm_head included; attention is small here)."""
    import onnx

    g = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in g.initializer}
    consumed = {x for n in g.node if n.op_type in ("MatMul", "Gemm", "DequantizeLinear") for x in n.input}
    return 2.0 * sum(int(np.prod(s)) for name, s in shapes.items()
                     if name in consumed and len(s) == 2 and min(s) >= 64)


def rooflines(label: str, onnx_dir: Path, rates: dict, bw: float, peak: float, tokens: int) -> None:
    weights = bytes_read_per_token(onnx_dir, 0)
    kv_row = bytes_read_per_token(onnx_dir, 1) - weights
    f = flops_per_row(onnx_dir)
    for n in sorted(k for k in rates if isinstance(k, int)):
        steps = rates[n] / n  # steps per second, one token per stream per step
        step_bytes = weights + n * (PROMPT + tokens / 2) * kv_row  # mean context over the run
        print(f"  {label} {n} streams: {steps * step_bytes / 1e9:5.1f} GB/s of {bw:.0f} "
              f"({100 * steps * step_bytes / 1e9 / bw:4.1f}% of the bandwidth roof), "
              f"{steps * n * f / 1e9:6.1f} GFLOP/s of {peak:.0f} ({100 * steps * n * f / 1e9 / peak:4.1f}% of "
              f"the compute roof; {f / 1e9:.2f} GFLOP per row)", flush=True)


# ---- the run -------------------------------------------------------------------------------------------------------

def table(model: str, rows: dict, streams: list[int]) -> None:
    base = rows["per-request threads"]
    for name, r in rows.items():
        cells = "  ".join(f"{n}: {r[n]:7.1f}" for n in streams)
        print(f"  {model:<10} {name:<22} {cells}   x1->x{streams[-1]}: {r[streams[-1]] / r[streams[0]]:.2f}x",
              flush=True)
    step = rows["step loop"]
    print(f"  step loop / per-request: " + "  ".join(f"{n}: {step[n] / base[n]:.2f}x" for n in streams), flush=True)


def raise_context(ckpt: Path, out: Path, n: int) -> Path:
    shutil.copytree(ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = n
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--tokens-2b", type=int, default=32)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--2b", dest="two_b", action="store_true")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="batch_decode_"))
    from trt_gemma.checkpoint.convert import convert_checkpoint

    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    bw, peak = bandwidth_gbs(), matmul_gflops()
    print(f"  float32 matmul: {peak:.0f} GFLOP/s", flush=True)
    ckpt = convert_checkpoint(None, work / "ckpt", dtype="float32", show_progress=False)
    dirs = {name: work / f"embedded-{flag[1]}" for name, flag in LAYOUTS.items()}
    for name, flag in LAYOUTS.items():
        export(ckpt, dirs[name], *flag)
    api = {name: run_child("api", d, args.streams, args.tokens) for name, d in dirs.items()}
    print(f"aggregate decode tok/s, embedded model, {args.tokens} tokens per stream (Python API):")
    table("embedded", api, streams)
    print(f"  step loop KV rows bound / exact past lengths: {api['step loop']['kv_read_over_needed']:.2f}x")
    lone = run_child("lone", Path(os.pathsep.join(str(d) for d in dirs.values())), "1", args.tokens)
    print(f"  one stream, alternating runs: step loop {lone['step loop']:.1f}, per-request {lone['per-request threads']:.1f} "
          f"tok/s ({lone['step loop'] / lone['per-request threads']:.3f}x; goal >= 0.97x)", flush=True)
    rooflines("embedded step loop", dirs["step loop"], api["step loop"], bw, peak, args.tokens)
    if not args.skip_server:
        served = {name: run_child("server", d, args.streams, args.tokens) for name, d in dirs.items()}
        print("aggregate decode tok/s through the server:")
        table("embedded", served, streams)
    gap_pool, gap_inplace = work / "embedded-4k-pool", work / "embedded-4k-inplace"
    long_ckpt = raise_context(ckpt, work / "ckpt-4k", 4096)
    export(long_ckpt, gap_pool, "--kv-cache", "pool")
    export(long_ckpt, gap_inplace, "--kv-cache", "inplace")
    print("token gaps of 3 running streams while a 2,000-token prompt is admitted:")
    for label, d, chunk in (("step loop, --prefill-chunk 32", gap_pool, 32),
                            ("step loop, --prefill-chunk 256", gap_pool, 256),
                            ("step loop, unchunked", gap_pool, 4096),
                            ("per-request threads", gap_inplace, 0)):
        g = run_child("gap", d, "3", 400, chunk)
        print(f"  {label:<32} idle step {g['idle_ms']:6.2f} ms, p99 gap during the prefill {g['p99_ms']:7.2f} ms "
              f"({g['p99_ms'] / g['idle_ms']:.1f}x idle), prefill {g['prefill_s']:.2f} s", flush=True)
    if args.two_b:
        bench_2b(work, args, streams, bw, peak)
    print(f"load average at the end {os.getloadavg()}")


def bench_2b(work: Path, args, streams: list[int], bw: float, peak: float) -> None:
    from trt_gemma.assets import default_model_dir
    from trt_gemma.checkpoint.hf import TOKENIZER_FILES

    size = write_synthetic_awq(work / "2b-awq")
    print(f"synthetic gemma-2-2b INT4-AWQ g128 checkpoint: {size / 1e9:.2f} GB", flush=True)
    dirs = {}
    for name, flag in LAYOUTS.items():
        dirs[name] = work / f"2b-{flag[1]}"
        export(work / "2b-awq", dirs[name], "--lm-head", "int4", "--max-seq-len", "512", *flag)
        for f in TOKENIZER_FILES:  # the synthetic checkpoint has none; ids decode to whatever the text is
            if (default_model_dir() / f).is_file():
                shutil.copy2(default_model_dir() / f, dirs[name] / f)
    shutil.rmtree(work / "2b-awq")
    rows = {name: run_child("api", d, args.streams, args.tokens_2b) for name, d in dirs.items()}
    print(f"aggregate decode tok/s, gemma-2-2b shape INT4-AWQ + int4 lm_head, {args.tokens_2b} tokens per stream:")
    table("2B shape", rows, streams)
    rooflines("2B step loop", dirs["step loop"], rows["step loop"], bw, peak, args.tokens_2b)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
