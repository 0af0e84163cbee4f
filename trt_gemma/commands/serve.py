"""`trt-gemma serve` and `trt-gemma telemetry`: thin wrappers around trt_gemma.serve.app.run_server and
trt_gemma.telemetry.snapshot."""
from __future__ import annotations

import time
from pathlib import Path

import click

from trt_gemma.console import console, emit
from trt_gemma.runtime.backends import BACKENDS
from trt_gemma.runtime.providers import DEVICES
from trt_gemma.runtime.steploop import DEFAULT_PREFILL_CHUNK
from trt_gemma.serve.app import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_QUEUE, DEFAULT_STREAM_INTERVAL_S
from trt_gemma.serve.conn import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_TIMEOUT_S
from trt_gemma.serve.guard import DEFAULT_GUARD_QUEUE


API_KEY_ENV = "TRT_GEMMA_API_KEY"
# `serve` options that --print-k8s does not copy into the Deployment's command, and why; every other option the user
# passed is copied as given (tests/test_k8s.py checks that each one round-trips), so a new flag cannot be dropped.
NOT_CARRIED = {
    "host": "the pod listens on 0.0.0.0",
    "port": "the manifest's containerPort and Service carry it",
    "api_key": "kept in a Kubernetes Secret (secretKeyRef), never in the manifest",
    "api_key_file": "kept in a Kubernetes Secret (secretKeyRef), never in the manifest",
    "insecure_no_auth": "added by the manifest exactly when there is no key",
    "print_k8s": "this option",
}
IN_VOLUME = ("guard", "guard_thresholds")  # local paths: copied into the models volume, read from there


@click.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar=API_KEY_ENV, show_envvar=True,
              help=f"Require 'Authorization: Bearer KEY' on /v1. A key given here shows in `ps`: prefer "
                   f"--api-key-file or ${API_KEY_ENV}. An empty key is refused.")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Read the API key from this file (one line; surrounding whitespace ignored).")
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve on a non-loopback --host without an API key (refused otherwise): anyone who can reach the "
                   "port may use the model.")
@click.option("--metrics-auth", is_flag=True,
              help="Require the API key on /metrics too (by default /metrics is open, as in vLLM and NIM: it "
                   "holds counts and sizes, no request text).")
@click.option("--max-queue", default=DEFAULT_MAX_QUEUE, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; beyond that: 429 + Retry-After.")
@click.option("--max-concurrency", default=DEFAULT_MAX_CONCURRENCY, show_default=True, type=click.IntRange(1),
              help="Generations running at once (worker threads; also sizes the KV budget).")
@click.option("--model-name", default=None, help="Model id clients send (default: the directory name).")
@click.option("--stream-interval", default=DEFAULT_STREAM_INTERVAL_S, show_default=True, type=click.FloatRange(0),
              help="Minimum seconds between SSE chunks of a stream; tokens in between share a chunk (0: per token).")
@click.option("--max-connections", default=None, type=click.IntRange(1),
              help="Open connections at most; beyond it the oldest one that has not sent its request is closed. "
                   "[default: from the open-file limit, at most 1024]")
@click.option("--header-timeout", default=DEFAULT_HEADER_TIMEOUT_S, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds a connection has to send its complete request headers, else it is closed.")
@click.option("--keep-alive-timeout", default=DEFAULT_KEEP_ALIVE_TIMEOUT_S, show_default=True,
              type=click.IntRange(1), help="Seconds an idle keep-alive connection stays open.")
@click.option("--body-timeout", default=DEFAULT_BODY_TIMEOUT_S, show_default=True,
              type=click.FloatRange(0, min_open=True), help="Seconds a request body has to arrive (else 408).")
@click.option("--print-k8s", is_flag=True, help="Print a Kubernetes Deployment + Service running this server and exit.")
@click.option("--exit-on-load-failure/--no-exit-on-load-failure", default=None,
              help="Exit (non-zero) when the model fails to load or the backend fails its health probe, so a "
                   "supervisor restarts it, instead of staying up with /health 503. "
                   "[default: on under systemd or in a container]")
@click.option("--guard", default=None, metavar="SHIELD",
              help="ShieldGemma beside the chat model (dir / hub id, `default`: the embedded model, no safety "
                   "model): adds /v1/moderations and checks chat prompts.")
@click.option("--guard-mode", type=click.Choice(["block", "annotate"]), default="block", show_default=True,
              help="block: a flagged prompt gets a 400 naming the policy; annotate: scores added to the response.")
@click.option("--guard-response", is_flag=True, help="Also check each completion (prompt-response template).")
@click.option("--guard-thresholds", type=click.Path(dir_okay=False), default=None,
              help="TOML [thresholds] table for the guard (default 0.5 per policy).")
@click.option("--guard-max-queue", default=DEFAULT_GUARD_QUEUE, show_default=True, type=click.IntRange(0),
              help="Moderation inputs that may wait for the guard; beyond that /v1/moderations answers 429 + "
                   "Retry-After (guarded chat checks go first and are bounded by --max-queue).")
@click.option("--backend", type=click.Choice(BACKENDS), default=BACKENDS[0], show_default=True,
              help="auto: a bundle's TensorRT engine where this host runs it, TensorRT-LLM for its engines, else "
                   "onnxruntime where installed, else the numpy reference.")
@click.option("--device", type=click.Choice(DEVICES), default=DEVICES[0], show_default=True,
              help="onnxruntime's execution provider: CUDA or TensorRT need onnxruntime-gpu (docs/jetson.md).")
@click.option("--prefill-chunk", default=DEFAULT_PREFILL_CHUNK, show_default=True, type=click.IntRange(1),
              help="Prompt tokens the batched step loop (onnxruntime, TensorRT) reads per step: a long prompt holds running "
                   "streams up for one chunk at a time.")
@click.pass_context
def serve(ctx, model, host, port, api_key, api_key_file, insecure_no_auth, metrics_auth, max_queue, max_concurrency,
          model_name, stream_interval, max_connections, header_timeout, keep_alive_timeout, body_timeout,
          exit_on_load_failure, print_k8s, guard, guard_mode, guard_response, guard_thresholds, guard_max_queue,
          backend, device, prefill_chunk):
    """Serve MODEL (HF dir / hub id / checkpoint / engine dir; default: the embedded model) with an OpenAI API."""
    if print_k8s:
        from trt_gemma.deploy.k8s import print_serve_manifests

        key = resolve_api_key(api_key, api_key_file)  # the key itself stays out of the manifest
        args, files = k8s_args(ctx)
        click.echo(print_serve_manifests(model, port, args, api_key=key is not None, files=files), nl=False)
        return
    from trt_gemma.checkpoint.hf import resolve_model
    from trt_gemma.serve.app import run_server

    key = resolve_api_key(api_key, api_key_file)  # before anything slow: a bad key is a typo to fix now
    require_auth(host, key, insecure_no_auth)
    path = resolve_model(model)
    name = model_name or (model if model and not Path(model).exists() else path.name)
    guard_cfg = None
    if guard is not None:  # the guard's path is checked now; it loads beside the model (serve/guard.py)
        from trt_gemma.serve.guard import GuardConfig

        guard_cfg = GuardConfig(str(resolve_model(guard)), guard_mode, guard_response, guard_thresholds,
                                max_queue=guard_max_queue)
        guard_cfg.check()
    run_server(path, model_name=name, host=host, port=port, api_key=key, max_queue=max_queue,
               max_concurrency=max_concurrency, stream_interval_s=stream_interval, header_timeout_s=header_timeout,
               keep_alive_timeout_s=keep_alive_timeout, body_timeout_s=body_timeout, max_connections=max_connections,
               exit_on_load_failure=exit_on_load_failure, metrics_auth=metrics_auth, guard=guard_cfg,
               backend=backend, device=device, prefill_chunk=prefill_chunk)


def require_auth(host: str, key: str | None, insecure_no_auth: bool) -> None:
    """No key on an address other machines can reach: refused unless the user says so with --insecure-no-auth."""
    import ipaddress

    from trt_gemma.errors import ConfigError

    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if key is None and not loopback and not insecure_no_auth:
        raise ConfigError(f"--host {host} serves other machines, and no API key is set: anyone who reaches the port "
                          "could use the model",
                          fix=f"pass --api-key-file KEYFILE (or ${API_KEY_ENV}), or --insecure-no-auth to serve "
                              "without a key on purpose")


def k8s_args(ctx: click.Context) -> tuple[list[str], list[str]]:
    """The serve flags the user passed, as the Deployment's command passes them (NOT_CARRIED aside), and the local
    files they name (IN_VOLUME options that are existing paths, remapped under the models volume)."""
    from click.core import ParameterSource

    from trt_gemma.deploy.k8s import MODEL_MOUNT

    args: list[str] = []
    files: list[str] = []
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in NOT_CARRIED:
            continue
        if ctx.get_parameter_source(p.name) in (None, ParameterSource.DEFAULT):
            continue
        value = ctx.params[p.name]
        if p.name in IN_VOLUME and value is not None and Path(value).exists():
            files.append(str(value))
            value = f"{MODEL_MOUNT}/{Path(value).name}"
        if p.is_flag and p.secondary_opts:  # --x/--no-x
            args.append(p.opts[0] if value else p.secondary_opts[0])
        elif p.is_flag:
            args += [p.opts[0]] if value else []
        elif value is not None:
            args += [p.opts[0], str(value)]
    return args, files


def resolve_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api-key / $TRT_GEMMA_API_KEY or --api-key-file; an empty one is an error, never "no auth".
    (click reads an empty environment variable as unset, so that case is checked here.)"""
    import os

    from trt_gemma.errors import ConfigError, InputError

    source = "--api-key"
    if api_key is None and API_KEY_ENV in os.environ:
        api_key, source = os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    if api_key is not None and api_key_file is not None:
        raise ConfigError("both an API key and --api-key-file were given",
                          fix=f"use one: --api-key-file, or --api-key / ${API_KEY_ENV}")
    if api_key_file is not None:
        try:
            api_key, source = api_key_file.read_text(encoding="utf-8").strip(), f"--api-key-file {api_key_file}"
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the API key file {api_key_file}: {e}",
                             fix="pass a readable UTF-8 text file holding the key") from e
    if api_key is not None and not api_key.strip():
        raise ConfigError(f"the API key from {source} is empty: that would turn authentication off",
                          fix=f"set a non-empty key, or unset {API_KEY_ENV} and drop --api-key to serve without one")
    return api_key


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
