"""`trt-gemma serve` and `trt-gemma telemetry`: thin wrappers around trt_gemma.serve.run_server and
trt_gemma.telemetry.snapshot."""
from __future__ import annotations

import time
from pathlib import Path

import click

from trt_gemma.console import console, emit
from trt_gemma.serve import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_QUEUE, DEFAULT_STREAM_INTERVAL_S


@click.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="TRT_GEMMA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")
@click.option("--max-queue", default=DEFAULT_MAX_QUEUE, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; beyond that: 429 + Retry-After.")
@click.option("--max-concurrency", default=DEFAULT_MAX_CONCURRENCY, show_default=True, type=click.IntRange(1),
              help="Generations running at once (worker threads; also sizes the KV budget).")
@click.option("--model-name", default=None, help="Model id clients send (default: the directory name).")
@click.option("--stream-interval", default=DEFAULT_STREAM_INTERVAL_S, show_default=True, type=click.FloatRange(0),
              help="Minimum seconds between SSE chunks of a stream; tokens in between share a chunk (0: per token).")
@click.option("--backend", type=click.Choice(["auto", "reference", "onnxruntime", "trtllm"]), default="auto",
              show_default=True, help="auto: TensorRT-LLM for engines, else onnxruntime where installed, else the "
                                      "numpy reference.")
def serve(model, host, port, api_key, max_queue, max_concurrency, model_name, stream_interval, backend):
    """Serve MODEL (HF dir / hub id / checkpoint / engine dir; default: the embedded model) with an OpenAI API."""
    from trt_gemma.hf import resolve_model
    from trt_gemma.serve import run_server

    path = resolve_model(model)
    name = model_name or (model if model and not Path(model).exists() else path.name)
    run_server(path, model_name=name, host=host, port=port, api_key=api_key, max_queue=max_queue,
               max_concurrency=max_concurrency, stream_interval_s=stream_interval, backend=backend)


@click.command()
@click.option("--watch", is_flag=True, help="Refresh a live table every --interval seconds (Ctrl-C to stop).")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--json", "as_json", is_flag=True, help="One JSON snapshot on stdout (one per line with --watch).")
@click.option("--root", default="/", type=click.Path(path_type=Path), hidden=True,
              help="Filesystem root for procfs/sysfs (testing on recorded trees).")
def telemetry(watch, interval, as_json, root):
    """Memory, power, GPU and KV telemetry of this host (NVML, Jetson sysfs, this process)."""
    from trt_gemma.telemetry import snapshot

    if not watch:
        emit(snapshot(root=root), as_json, lambda s: console.print(render_table(s)))
        return
    try:
        _watch(snapshot, root, interval, as_json)
    except KeyboardInterrupt:  # Ctrl-C is how --watch ends: not an error
        pass


def _watch(snapshot, root: Path, interval: float, as_json: bool) -> None:
    if as_json:
        import json

        while True:
            click.echo(json.dumps(snapshot(root=root)))
            time.sleep(interval)
    from rich.live import Live

    with Live(render_table(snapshot(root=root)), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(render_table(snapshot(root=root)))


def _bytes(v) -> str:
    return f"{v / 2**30:.2f} GiB" if isinstance(v, (int, float)) else str(v)


def render_table(snap: dict):
    from rich.table import Table

    t = Table(title=f"trt-gemma telemetry ({snap['host']['platform']})", show_header=True)
    t.add_column("source")
    t.add_column("field")
    t.add_column("value", justify="right")
    for kind, v in snap["memory_bytes"].items():
        t.add_row("memory", kind, _bytes(v))
    nv = snap["nvml"]
    if not nv["available"]:
        t.add_row("nvml", "status", nv["reason"])
    for d in nv.get("devices", []):
        tag = f"gpu{d['index']}"
        t.add_row(tag, "name", str(d.get("name")))
        for k in ("used", "reserved", "total"):
            t.add_row(tag, f"memory {k}", _bytes(d.get("memory", {}).get(k)))
        t.add_row(tag, "this process", _bytes(d.get("process_memory_bytes")))
        t.add_row(tag, "utilization %", str(d.get("utilization_gpu_percent")))
        p = d.get("power_mw")
        t.add_row(tag, "power", f"{p / 1000:.1f} W" if isinstance(p, int) else str(p))
        t.add_row(tag, "temperature C", str(d.get("temperature_c")))
    j = snap.get("jetson")
    if j:
        for g in j["gpu"]:
            t.add_row("jetson", f"{g['name']} load %", str(g["load_percent"]))
            f = g["cur_freq_hz"]
            t.add_row("jetson", f"{g['name']} freq", f"{f / 1e6:.0f} MHz" if isinstance(f, int) else str(f))
        for name, r in j["rails"].items():
            t.add_row("jetson", f"rail {name}", f"{r['power_mw']} mW")
        for name, c in j["thermal_c"].items():
            t.add_row("jetson", f"temp {name}", f"{c:.1f} C")
    p = snap["process"]
    t.add_row("process", "rss / peak", f"{_bytes(p['rss_bytes'])} / {_bytes(p['peak_rss_bytes'])}")
    return t
