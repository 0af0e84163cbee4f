"""`trt-gemma export-triton`: thin wrapper around trt_gemma.deploy.triton (export, or --inspect a repository)."""
from __future__ import annotations


import click

from trt_gemma.console import plain as _out
from trt_gemma.deploy.triton import DEFAULT_INSTANCES, DEFAULT_MAX_QUEUE_SIZE, DEFAULT_REPO_PATH


@click.command("export-triton")
@click.argument("bundle", type=click.Path())
@click.argument("out", type=click.Path(), required=False)
@click.option("--tp", type=click.IntRange(1), default=None, help="Tensor-parallel GPUs (default: the engine's).")
@click.option("--instances", type=click.IntRange(1), default=DEFAULT_INSTANCES, show_default=True,
              help="Instances of the pre/post-processing Python models.")
@click.option("--streaming/--no-streaming", default=False, show_default=True,
              help="Decoupled mode: tokens streamed as generated (generate_stream, gRPC stream).")
@click.option("--max-queue-size", type=click.IntRange(0), default=DEFAULT_MAX_QUEUE_SIZE, show_default=True,
              help="Requests Triton queues per model before rejecting.")
@click.option("--repo-path", default=DEFAULT_REPO_PATH, show_default=True,
              help="Where the repository is mounted for Triton (paths inside the configs).")
@click.option("--k8s", is_flag=True, help="Also write kubernetes.yaml (PVC + Deployment + Service).")
@click.option("--triton-image", default=None, help="Triton image for --k8s (default: the release of the engine's "
                                                   "TensorRT-LLM).")
@click.option("--name", default=None, help="Kubernetes object name (default: triton-<model>).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--inspect", "inspect_", is_flag=True, help="Check an exported repository (BUNDLE is the repository).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_triton(bundle, out, tp, instances, streaming, max_queue_size, repo_path, k8s, triton_image, name, force,
                  inspect_, as_json):
    """Write a Triton Inference Server model repository (TensorRT-LLM backend, in-flight batching) for BUNDLE's
    engine into OUT; or, with --inspect, check one."""
    from trt_gemma.console import emit, err_console
    from trt_gemma.errors import ConfigError
    from trt_gemma.deploy.triton import export_triton as run
    from trt_gemma.deploy.inspect import inspect_repository

    if inspect_:
        emit(inspect_repository(bundle), as_json, _render_inspect)
        return
    if out is None:
        raise ConfigError("OUT is missing", fix="trt-gemma export-triton BUNDLE OUT")
    log = None if as_json else (lambda msg: err_console.print(f"[dim]export-triton:[/] {msg}"))
    result = run(bundle, out, tp=tp, instances=instances, streaming=streaming, k8s=k8s, force=force,
                 repo_path=repo_path, max_queue_size=max_queue_size, triton_image=triton_image, name=name, log=log)
    emit(result.to_dict(), as_json, _render_export)


def _render_export(r: dict) -> None:
    v = r["values"]
    _out(f"Triton model repository: {r['out']}  (from {r['bundle']}, TensorRT-LLM {r['trtllm_version']}, tp {r['tp']})")
    _out(f"  max_batch_size {v['triton_max_batch_size']}, max_queue_size {v['max_queue_size']}, "
         f"decoupled {str(v['decoupled_mode']).lower()}, kv_cache_free_gpu_mem_fraction "
         f"{v['kv_cache_free_gpu_mem_fraction']}, gpu_device_ids {v['gpu_device_ids']}")
    _out(f"  max_attention_window_size {v['max_attention_window_size']}")
    if r["k8s"]:
        _out(f"  kubernetes: {r['k8s']}")
    _out("run it:")
    for step in r["next"]:
        _out(f"  {step}")


def _render_inspect(x: dict) -> None:
    _out(f"{x['path']}: Triton repository from {x['bundle']} (TensorRT-LLM {x['trtllm_version']}, tp {x['tp']})")
    _out(f"  schema: {x['schema']}")
    for model, row in x["models"].items():
        state = "ok" if row.get("schema_ok", True) and row["config"] and not row.get("missing") else "PROBLEM"
        extra = row.get("error") or (f"missing {', '.join(row['missing'])}" if row.get("missing") else "")
        if row["placeholders"]:
            extra += f" placeholders left: {', '.join(row['placeholders'])}"
        _out(f"  [{state}] {model:<18} {extra}".rstrip())
    if x["ensemble_problems"]:
        for p in x["ensemble_problems"]:
            _out(f"  ensemble: {p}")
    elif x["ensemble_problems"] == []:
        _out("  ensemble: every step input is an ensemble input or an earlier step's output")
    _out(f"  engine: {', '.join(x['engine_files']) or 'missing'}; kubernetes.yaml: {'yes' if x['kubernetes'] else 'no'}")
    _out(f"  ok: {'yes' if x['ok'] else 'no'}")
