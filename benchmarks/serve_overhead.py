"""Serving overhead: decode tokens/s of the reference backend called directly vs through `trt-gemma serve` with one
streaming `openai` client (goal: <= 5% overhead) and vs the Python API's `Model.stream` over the same backend object
(trt_gemma.load's Model: the scheduler's slot, text pieces, and a lone stream's steps run on the caller's thread;
goal: <= 2%), same prompt,
same run, repetitions interleaved.

The API row is a difference of a few percent between two in-process paths, which a shared host's noise (another
process taking the core for a second) easily swamps: it is measured as many short paired rounds (--api-rounds of
--api-tokens tokens each; in every round both paths run back to back, the first one alternating), and reported as
the median and quartiles of the per-round ratios, plus CPU-seconds per token of this process (worker thread
included) for both paths, which a busy neighbour disturbs far less than wall time.

The server runs as its own process (as in production: `python -m trt_gemma serve CKPT`), the direct calls in this
one; both use the same checkpoint, prompt token ids, greedy sampling and `ignore_eos` so each run makes exactly
--tokens tokens. Reported per path: the median over --reps of tokens / (time from request to the last token), the
median of the per-repetition ratios (adjacent runs share the machine's load, so on a busy host the paired ratio
is the steadier figure), and CPU-seconds per token (direct: this process; served: the server process, psutil), which other
processes' load disturbs far less than wall time.

  python benchmarks/serve_overhead.py [--model DIR] [--tokens 128] [--reps 5] [--api-rounds 40] [--api-only]
                                      [--json]
With no --model: the embedded default model when it is installed, else the tiny test model from tests/tiny.py.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trt_gemma.errors import TrtGemmaError

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The server streams tokens and reports memory. Gemma runs on NVIDIA Jetson and RTX GPUs."


def default_model(tmp: Path) -> Path:
    try:
        from trt_gemma.assets import default_model_dir

        path = default_model_dir()
        if (path / "config.json").is_file():
            return path
    except (ImportError, AttributeError, OSError, TrtGemmaError):  # not built yet: use the tiny test model
        pass
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp / "tiny_hf", max_position_embeddings=2048)


def as_checkpoint(model: Path, tmp: Path) -> Path:
    from trt_gemma.runtime.backends import detect_kind, ensure_converted

    return ensure_converted(model, tmp / "cache") if detect_kind(model) == "hf" else model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, stream_interval: float | None) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "trt_gemma", "serve", str(ckpt), "--port", str(port),
                             "--max-concurrency", "1", "--model-name", "bench",
                             "--backend", "reference"]  # the backend the direct path calls (auto: onnxruntime)
                            + ([] if stream_interval is None else ["--stream-interval", str(stream_interval)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not become healthy in 300 s")


def run_direct(backend, ids: list[int], tokens: int) -> tuple[float, float]:
    """(tokens/s, CPU-seconds per token)."""
    from trt_gemma.runtime.backends import GenerationParams

    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in backend.stream(ids, GenerationParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)))
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def run_api(model, ids: list[int], tokens: int) -> tuple[float, float]:
    """(tokens/s seen by the caller of Model.stream, CPU-seconds per token of this process, worker included)."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(p.token_ids) for p in model.stream(ids, max_tokens=tokens, ignore_eos=True))
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def api_rounds(backend, api, ids: list[int], tokens: int, rounds: int) -> list[tuple[tuple, tuple]]:
    """[(direct, api)] per round, each (tokens/s, CPU-s per token); the path that goes first alternates, so a slow
    drift of the host's load biases neither."""
    pairs = []
    for r in range(rounds):
        d = a = None
        if r % 2:
            a = run_api(api, ids, tokens)
        d = run_direct(backend, ids, tokens)
        if a is None:
            a = run_api(api, ids, tokens)
        pairs.append((d, a))
    return pairs


def run_served(client, server, ids: list[int], tokens: int) -> tuple[float, float]:
    """(tokens/s seen by the client, server CPU-seconds per token)."""
    c0 = sum(server.cpu_times()[:2])
    t0 = time.perf_counter()
    stream = client.completions.create(model="bench", prompt=ids, max_tokens=tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    n = None
    for chunk in stream:
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    wall = time.perf_counter() - t0
    return n / wall, (sum(server.cpu_times()[:2]) - c0) / n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stream-interval", type=float, default=None, help="server's --stream-interval (default: its own)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP threads for both paths (1: no spinning BLAS helpers muddying CPU time)")
    ap.add_argument("--api-rounds", type=int, default=40, help="paired direct/API rounds for the API row")
    ap.add_argument("--api-tokens", type=int, default=32, help="tokens per API-row round")
    ap.add_argument("--api-only", action="store_true", help="measure the API row only (no server)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy loads here; inherited by the server process

    import openai
    import psutil

    from trt_gemma.api import Model
    from trt_gemma.runtime.reference import ReferenceBackend

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = args.model or default_model(tmp)
        ckpt = as_checkpoint(model, tmp)
        backend = ReferenceBackend.load(ckpt, slots=1)
        api = Model(backend, max_concurrency=1)  # the API over the very backend object called directly
        ids = backend.encode(PROMPT)
        run_direct(backend, ids, 8), run_api(api, ids, 8)  # warm-up
        result = summarize_api(api_rounds(backend, api, ids, args.api_tokens, args.api_rounds))
        result.update(model=str(model), prompt_tokens=len(ids), cpu_count=os.cpu_count(),
                      load_avg_1m=os.getloadavg()[0])
        if not args.api_only:
            result.update(measure_served(backend, ckpt, ids, model, args, openai, psutil))
        api.close()
    print(json.dumps(result, indent=2) if args.json else report(result, args))
    return result


def measure_served(backend, ckpt: Path, ids: list[int], model: Path, args, openai, psutil) -> dict:
    port = free_port()
    proc = start_server(ckpt, port, args.stream_interval)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        server = psutil.Process(proc.pid)
        run_direct(backend, ids, 8), run_served(client, server, ids, 8)  # warm-up
        direct, served = [], []
        for rep in range(args.reps):  # interleave, alternating which path goes first
            pair = [lambda: direct.append(run_direct(backend, ids, args.tokens)),
                    lambda: served.append(run_served(client, server, ids, args.tokens))]
            for run in pair[rep % 2:] + pair[:rep % 2]:
                run()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return summarize(direct, served, model, len(ids), args)


def report(r: dict, args) -> str:
    lines = [f"model {r['model']} ({r['prompt_tokens']} prompt tokens, {os.cpu_count()} CPUs, "
             f"load avg {r['load_avg_1m']:.1f})"]
    if "direct_median" in r:
        lines += [
            f"served row: {args.tokens} tokens x {args.reps} reps interleaved",
            f"direct  {r['direct_median']:8.1f} tok/s  (runs: {', '.join(f'{x:.1f}' for x in r['direct_tok_s'])})",
            f"served  {r['served_median']:8.1f} tok/s  (runs: {', '.join(f'{x:.1f}' for x in r['served_tok_s'])})",
            f"ratio of medians {r['ratio_of_medians']:.3f}; median paired ratio {r['median_paired_ratio']:.3f} "
            f"-> throughput overhead {r['overhead_pct']:.1f}% (goal <= 5%)",
            f"CPU per token: direct {r['direct_cpu_ms_per_token']:.2f} ms, server "
            f"{r['served_cpu_ms_per_token']:.2f} ms -> CPU overhead {r['cpu_overhead_pct']:.1f}%"]
    q1, q3 = r["api_paired_ratio_quartiles"]
    return "\n".join(lines + [
        f"api row: {r['api_rounds']} paired rounds of {args.api_tokens} tokens (first path alternating)",
        f"direct  {r['api_direct_median']:8.1f} tok/s   api {r['api_median']:8.1f} tok/s  (medians)",
        f"api/direct per round: median {r['api_median_paired_ratio']:.3f} (quartiles {q1:.3f}..{q3:.3f}) -> "
        f"throughput overhead {r['api_overhead_pct']:.1f}% (goal <= 2%)",
        f"CPU per token: direct {r['api_direct_cpu_ms_per_token']:.2f} ms, api {r['api_cpu_ms_per_token']:.2f} ms "
        f"-> median paired CPU overhead {r['api_cpu_overhead_pct']:.1f}%",
        f"added per token (median paired): {r['api_added_us_per_token']:.0f} us wall, "
        f"{r['api_added_cpu_us_per_token']:.0f} us CPU"])


def summarize(direct, served, model, prompt_tokens, args) -> dict:
    d_tps, d_cpu = [x[0] for x in direct], [x[1] for x in direct]
    s_tps, s_cpu = [x[0] for x in served], [x[1] for x in served]
    paired = statistics.median(s / d for s, d in zip(s_tps, d_tps))
    dc, sc = statistics.median(d_cpu), statistics.median(s_cpu)
    return {"model": str(model), "prompt_tokens": prompt_tokens, "tokens": args.tokens, "reps": args.reps,
            "direct_tok_s": d_tps, "served_tok_s": s_tps, "direct_median": statistics.median(d_tps),
            "served_median": statistics.median(s_tps),
            "ratio_of_medians": statistics.median(s_tps) / statistics.median(d_tps),
            "median_paired_ratio": paired, "overhead_pct": 100 * (1 - paired),
            "direct_cpu_ms_per_token": 1e3 * dc, "served_cpu_ms_per_token": 1e3 * sc,
            "cpu_overhead_pct": 100 * (sc / dc - 1),
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}


def summarize_api(pairs) -> dict:
    """Medians over rounds: a round disturbed by another process moves a quartile, not the median."""
    ratios = [a[0] / d[0] for d, a in pairs]
    cpu_ratios = [a[1] / d[1] for d, a in pairs]
    paired = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (paired, paired, paired)
    return {"api_rounds": len(pairs), "api_tok_s": [a[0] for _, a in pairs],
            "api_direct_median": statistics.median(d[0] for d, _ in pairs),
            "api_median": statistics.median(a[0] for _, a in pairs), "api_median_paired_ratio": paired,
            "api_paired_ratio_quartiles": [q1, q3], "api_overhead_pct": 100 * (1 - paired),
            "api_direct_cpu_ms_per_token": 1e3 * statistics.median(d[1] for d, _ in pairs),
            "api_cpu_ms_per_token": 1e3 * statistics.median(a[1] for _, a in pairs),
            "api_cpu_overhead_pct": 100 * (statistics.median(cpu_ratios) - 1),
            # what the API adds per token, whatever the model: on a small model's 2 ms step a few percent, on a
            # 2B model's tens of ms a fraction of one
            "api_added_us_per_token": 1e6 * statistics.median(1 / a[0] - 1 / d[0] for d, a in pairs),
            "api_added_cpu_us_per_token": 1e6 * statistics.median(a[1] - d[1] for d, a in pairs)}


if __name__ == "__main__":
    main()
