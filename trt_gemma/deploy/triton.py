"""`trt-gemma export-triton`: a bundle's engine as a Triton Inference Server model repository (TensorRT-LLM backend).

The repository is tensorrtllm_backend's `inflight_batcher_llm` layout for TensorRT-LLM 1.x: preprocessing (tokenize),
tensorrt_llm (the C++ in-flight batcher over our engine), postprocessing (detokenize), ensemble (the three chained)
and tensorrt_llm_bls (the same chain as a Python "business logic" model). Tensors: trt_gemma.deploy.models. Parameter
names and which are mandatory: triton-inference-server/tensorrtllm_backend/docs/model_config.md@v1.0.0 (efb8a497);
how the C++ model reads them: NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/model_instance_state.cc
@0c8de69a (1.2.0rc8). Where fill_template.py leaves `${name}` for "unset" (the backend's number parsers reject it and
fall back), we write nothing, except for the three strings that file reads without a fallback (tokenizer_dir,
guided_decoding_backend, xgrammar_tokenizer_info_path) and the Python models' parameters, which treat "" as unset.

Layout written (paths inside configs are where the repository is mounted, --repo-path, default /models):
  <model>/config.pbtxt and <model>/1/       Triton's model directories (the Python models' 1/model.py come from
                                             the Triton container at start: `cp -rn /app/all_models/...`, below)
  tensorrt_llm/1/engine/                    the bundle's engine (hard links when on the same filesystem)
  tensorrt_llm/1/tokenizer/                 the bundle's tokenizer files
  trt_gemma_triton.json                     what was exported from what, with the filled values
  kubernetes.yaml                           with --k8s (Triton takes only the repository's subdirectories as
                                             models: triton-inference-server/core model_repository_manager.cc)
Checking a written repository: trt_gemma.deploy.inspect.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trt_gemma import manifest as mf
from trt_gemma.errors import ConfigError, InputError
from trt_gemma.fsutil import atomic_output_dir, check_output_target
from trt_gemma.safe_io import copy_in
from trt_gemma.checkpoint.hf import TOKENIZER_FILES
from trt_gemma.deploy.models import ENSEMBLE_STEPS, Raw, parameters, tensors, to_pbtxt

EXPORT_MANIFEST = "trt_gemma_triton.json"
K8S_FILE = "kubernetes.yaml"
DEFAULT_REPO_PATH = "/models"
# Python-model instances (pre/post-processing): tensorrtllm_backend/docs/model_config.md "instance_count ... 5 works well".
DEFAULT_INSTANCES = 5
# Requests Triton queues per model before rejecting: trt-gemma serve's --max-queue default (trt_gemma.serve.app
# DEFAULT_MAX_QUEUE; a test keeps them equal, the serve extra is not imported here).
DEFAULT_MAX_QUEUE_SIZE = 16
MAX_QUEUE_DELAY_US = 0  # the backend README's value: batch what is there, wait for nothing
# The backend templates (and model_config.md) above are those of TensorRT-LLM 1.x; our engines pin >=1.0,<1.3.
SUPPORTED_TRTLLM = ((1, 0), (1, 3))
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"  # tensorrt_llm/config.pbtxt literal

# tensorrtllm_backend/docs/model_config.md@v1.0.0 "Mandatory parameters", per model (template variable names).
MANDATORY: dict[str, tuple[str, ...]] = {
    "ensemble": ("triton_max_batch_size", "logits_datatype"),
    "preprocessing": ("triton_max_batch_size", "tokenizer_dir", "preprocessing_instance_count",
                      "max_queue_delay_microseconds", "max_queue_size"),
    "postprocessing": ("triton_max_batch_size", "tokenizer_dir", "postprocessing_instance_count"),
    "tensorrt_llm": ("triton_backend", "triton_max_batch_size", "decoupled_mode", "max_queue_delay_microseconds",
                     "max_queue_size", "engine_dir", "batching_strategy", "encoder_input_features_data_type",
                     "logits_datatype"),
    "tensorrt_llm_bls": ("triton_max_batch_size", "decoupled_mode", "bls_instance_count", "logits_datatype"),
}


@dataclass
class ExportResult:
    out: Path
    bundle: Path
    values: dict
    tp: int
    trtllm_version: str
    k8s_file: Path | None = None
    image: str | None = None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "bundle": str(self.bundle), "tp": self.tp, "trtllm_version": self.trtllm_version,
                "values": self.values, "k8s": str(self.k8s_file) if self.k8s_file else None, "notes": self.notes,
                "triton_image": self.image,
                "next": next_steps(self.out, self.tp, self.values["repo_path"], self.k8s_file is not None,
                                   self.values["decoupled_mode"], self.image)}


# --- reading the bundle -------------------------------------------------------------------------------------------

def _version_tuple(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_trtllm_version(version: str | None) -> tuple[int, int]:
    """The engine's TensorRT-LLM must be one the 1.x backend layout serves (engines only load in the same version)."""
    v = _version_tuple(version)
    lo, hi = SUPPORTED_TRTLLM
    if v is None or not lo <= v < hi:
        raise ConfigError(f"the engine was built with TensorRT-LLM {version or 'unknown'}; this export writes the "
                          f"tensorrtllm_backend layout of TensorRT-LLM {lo[0]}.{lo[1]}-{hi[0]}.{hi[1] - 1}",
                          fix="recompile the bundle with TensorRT-LLM >=1.0,<1.3 (trt-gemma build --from-bundle "
                              "BUNDLE --force) and serve it with the Triton release that ships that version")
    return v


def _compile_steps(bundle: Path, recipe) -> str:
    from trt_gemma.build import on_target_commands

    return " or ".join(f"`{c}`" for c in on_target_commands(bundle, recipe)[:2])


def read_bundle(bundle: Path) -> tuple[dict, dict, Path]:
    """(manifest, engine config.json, engine dir) of a compiled bundle; typed errors say how to compile."""
    from trt_gemma.runtime.trtllm import is_engine_dir, read_engine_config
    from trt_gemma.build import read_bundle as read_recipe_of

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputError(f"{bundle} is not a directory", fix="pass a bundle written by `trt-gemma build`")
    manifest = mf.read_manifest(bundle)
    if manifest.get("kind") != "bundle":
        raise InputError(f"{bundle} is a {manifest.get('kind')}, not a bundle",
                         fix="pass the bundle directory (the parent of engine/)")
    engine = bundle / "engine"
    if not is_engine_dir(engine):
        recipe = read_recipe_of(bundle)[2]
        raise InputError(f"{bundle} has no compiled engine (engine/config.json + rank0.engine): Triton's TensorRT-LLM "
                         "backend serves engines, not checkpoints",
                         fix=f"compile it on a GPU host with TensorRT-LLM >=1.0,<1.3: {_compile_steps(bundle, recipe)}")
    return manifest, read_engine_config(engine), engine


def layer_windows(pretrained: dict, checkpoint_cfg: Path, max_seq_len: int) -> list[int]:
    """max_attention_window_size per layer: Gemma 2 alternates sliding-window and global layers (transformers
    `layer_types`). TRT-LLM's Gemma 2 config keeps no window, so without this list every layer attends globally
    (NVIDIA/TensorRT-LLM #10620: use a per-layer max_attention_window). The window lives under our own checkpoint
    key (trt_gemma.checkpoint.convert.EXTRA_KEY); TRT-LLM turns unknown checkpoint keys into config attributes, so the engine's
    pretrained_config may carry it too. The engine's copy is used when present, else the bundle's checkpoint."""
    from trt_gemma.reference.checkpoint import CheckpointConfig

    source = pretrained if isinstance(pretrained.get("trt_gemma"), dict) else None
    cfg = (CheckpointConfig.from_dict(source, source="engine config.json") if source
           else CheckpointConfig.from_file(checkpoint_cfg))
    window = cfg.sliding_window or max_seq_len  # is_sliding() is False for every layer when there is no window
    return [min(window, max_seq_len) if cfg.is_sliding(i) else max_seq_len for i in range(cfg.num_hidden_layers)]


def fill_values(manifest: dict, engine_cfg: dict, bundle: Path, tp: int, instances: int, streaming: bool,
                repo_path: str, max_queue_size: int) -> dict:
    """Every template variable we set, by its tensorrtllm_backend name, from the bundle's recipe and engine."""
    from trt_gemma.engine.trtllm_flags import plugin_values

    pre, build = engine_cfg["pretrained_config"], engine_cfg["build_config"]
    recipe = manifest["recipe"]
    engine_dir = f"{repo_path.rstrip('/')}/tensorrt_llm/1/engine"
    max_seq_len = int(build["max_seq_len"])
    windows = layer_windows(pre, bundle / "checkpoint" / "config.json", max_seq_len)
    model_dtype = TRITON_DTYPES.get(str(pre.get("dtype")), "FP16")
    return {
        "repo_path": repo_path,
        "triton_backend": "tensorrtllm",
        # Triton's batch ceiling = the engine's (TRT-LLM schedules up to build max_batch_size anyway)
        "triton_max_batch_size": int(build["max_batch_size"]),
        "decoupled_mode": bool(streaming),
        "max_queue_delay_microseconds": MAX_QUEUE_DELAY_US,
        "max_queue_size": int(max_queue_size),
        "engine_dir": engine_dir,
        "tokenizer_dir": f"{repo_path.rstrip('/')}/tensorrt_llm/1/tokenizer",
        "batching_strategy": "inflight_fused_batching",
        "logits_datatype": "TYPE_" + TRITON_DTYPES.get(str(pre.get("logits_dtype", "float32")), "FP32"),
        "encoder_input_features_data_type": "TYPE_" + model_dtype,  # decoder-only: declared, never sent
        "prompt_embedding_table_data_type": "TYPE_" + model_dtype,
        "kv_cache_free_gpu_mem_fraction": float(recipe["kv_cache_free_gpu_memory_fraction"]),
        "max_tokens_in_paged_kv_cache": int(recipe.get("kv_cache_max_tokens") or 0) or None,
        "max_attention_window_size": ",".join(str(w) for w in windows),
        "exclude_input_in_output": True,  # completions only, as our OpenAI server answers
        "max_beam_width": int(build.get("max_beam_width") or 1),
        # KV reuse needs paged context FMHA, which our build enables unless the KV cache is INT8 (trtllm_flags);
        # layers whose window is shorter than max_seq_len keep a cyclic cache, which we do not ask to reuse [INF]
        "enable_kv_cache_reuse": plugin_values(recipe)["use_paged_context_fmha"] == "enable"
        and len(set(windows)) == 1,
        "batch_scheduler_policy": "guaranteed_no_evict",
        # GPUs as the container sees them (the device plugin renumbers from 0); one tp group per instance
        "gpu_device_ids": ",".join(str(i) for i in range(tp)),
        "preprocessing_instance_count": int(instances),
        "postprocessing_instance_count": int(instances),
        # BLS: "set the number of model instances to the maximum batch size" (model_config.md)
        "bls_instance_count": int(build["max_batch_size"]),
        "add_special_tokens": True,  # Gemma prompts start with <bos>; the tokenizer adds it
        "skip_special_tokens": True,
        "accumulate_tokens": False,
        "tensorrt_llm_model_name": "tensorrt_llm",
    }


# --- the five configs ---------------------------------------------------------------------------------------------

def _b(v: bool) -> str:
    return "true" if v else "false"


def _io(model: str, v: dict) -> dict:
    types = {"$logits": v["logits_datatype"][5:], "$encoder": v["encoder_input_features_data_type"][5:],
             "$model": v["prompt_embedding_table_data_type"][5:]}
    return {"input": [t.to_pb(True) for t in tensors(model, "inputs", types)],
            "output": [t.to_pb(False) for t in tensors(model, "outputs", types)]}


def _queue(v: dict) -> dict:
    return {"preferred_batch_size": [v["triton_max_batch_size"]],
            "max_queue_delay_microseconds": v["max_queue_delay_microseconds"],
            "default_queue_policy": {"max_queue_size": v["max_queue_size"]}}


def _cpu_instances(count: int) -> list[dict]:
    return [{"count": count, "kind": Raw("KIND_CPU")}]


def _trtllm_parameters(v: dict) -> dict:
    p = {"max_beam_width": v["max_beam_width"], "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
         "gpt_model_type": v["batching_strategy"], "gpt_model_path": v["engine_dir"],
         "max_tokens_in_paged_kv_cache": v["max_tokens_in_paged_kv_cache"],
         "max_attention_window_size": v["max_attention_window_size"],
         "batch_scheduler_policy": v["batch_scheduler_policy"],
         "kv_cache_free_gpu_mem_fraction": v["kv_cache_free_gpu_mem_fraction"],
         "exclude_input_in_output": _b(v["exclude_input_in_output"]),
         "enable_kv_cache_reuse": _b(v["enable_kv_cache_reuse"]), "enable_chunked_context": "false",
         "gpu_device_ids": v["gpu_device_ids"], "num_nodes": 1, "executor_worker_path": EXECUTOR_WORKER,
         # read without a fallback by model_instance_state.cc (guided decoding); "" = off
         "tokenizer_dir": v["tokenizer_dir"], "guided_decoding_backend": "", "xgrammar_tokenizer_info_path": ""}
    return {k: val for k, val in p.items() if val is not None}


def model_configs(v: dict) -> dict[str, dict]:
    """The five ModelConfig messages as dicts (written by deploy/models.to_pbtxt)."""
    batch = v["triton_max_batch_size"]
    steps = [{"model_name": m, "model_version": -1,
              "input_map": [{"key": k, "value": t} for k, t in ins.items()],
              "output_map": [{"key": k, "value": t} for k, t in outs.items()]} for m, ins, outs in ENSEMBLE_STEPS]
    return {
        "preprocessing": {"name": "preprocessing", "backend": "python", "max_batch_size": batch,
                          "dynamic_batching": _queue(v), **_io("preprocessing", v),
                          "parameters": parameters({"tokenizer_dir": v["tokenizer_dir"],
                                                    "add_special_tokens": _b(v["add_special_tokens"]),
                                                    "multimodal_model_path": "", "gpt_model_path": v["engine_dir"],
                                                    "max_num_images": "", "hf_model_path": ""}),
                          "instance_group": _cpu_instances(v["preprocessing_instance_count"])},
        "tensorrt_llm": {"name": "tensorrt_llm", "backend": v["triton_backend"], "max_batch_size": batch,
                         "model_transaction_policy": {"decoupled": v["decoupled_mode"]},
                         "dynamic_batching": _queue(v), **_io("tensorrt_llm", v),
                         # one executor; with tp > 1 it spans the tp GPUs of gpu_device_ids
                         "instance_group": _cpu_instances(1),
                         "parameters": parameters(_trtllm_parameters(v))},
        "postprocessing": {"name": "postprocessing", "backend": "python", "max_batch_size": batch,
                           "dynamic_batching": {}, **_io("postprocessing", v),
                           "parameters": parameters({"tokenizer_dir": v["tokenizer_dir"],
                                                     "skip_special_tokens": _b(v["skip_special_tokens"])}),
                           "instance_group": _cpu_instances(v["postprocessing_instance_count"])},
        "ensemble": {"name": "ensemble", "platform": "ensemble", "max_batch_size": batch, **_io("ensemble", v),
                     "ensemble_scheduling": {"step": steps}},
        "tensorrt_llm_bls": {"name": "tensorrt_llm_bls", "backend": "python", "max_batch_size": batch,
                             "model_transaction_policy": {"decoupled": v["decoupled_mode"]},
                             **_io("tensorrt_llm_bls", v),
                             "parameters": parameters({"accumulate_tokens": _b(v["accumulate_tokens"]),
                                                       "tensorrt_llm_model_name": v["tensorrt_llm_model_name"],
                                                       "tensorrt_llm_draft_model_name": "",
                                                       "multimodal_encoders_name": ""}),
                             "instance_group": _cpu_instances(v["bls_instance_count"])},
    }


# --- writing ------------------------------------------------------------------------------------------------------

def _copy_tree(bundle: Path, src: Path, dst: Path, names=None) -> None:
    """The files of `src`, a folder of `bundle` (each checked under the bundle: safe_io.copy_in), hard-linked when OUT
    is on the bundle's filesystem (engines are GBs), copied otherwise."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and (names is None or f.name in names):
            copy_in(bundle, f.relative_to(bundle), dst / f.name, link=True,
                    fix="copy the bundle again from where it was built")


def export_triton(bundle: str | Path, out: str | Path, tp: int | None = None, instances: int = DEFAULT_INSTANCES,
                  streaming: bool = False, k8s: bool = False, force: bool = False, repo_path: str = DEFAULT_REPO_PATH,
                  max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE, triton_image: str | None = None,
                  name: str | None = None, log: Callable[[str], None] | None = None) -> ExportResult:
    """Write the model repository for `bundle` into `out` (atomically); see the module docstring."""
    bundle, out = Path(bundle), Path(out)
    check_output_target(out, force)
    manifest, engine_cfg, engine = read_bundle(bundle)
    version = str(engine_cfg.get("version") or (manifest.get("tools") or {}).get("tensorrt_llm") or "")
    check_trtllm_version(version)
    mapping = engine_cfg["pretrained_config"].get("mapping") or {}
    engine_tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    if pp != 1:
        raise ConfigError(f"the engine uses pipeline parallelism (pp_size {pp}); multi-node pipeline parallel serving "
                          "is not covered by this export", fix="build the bundle with pp_size 1 (tensor parallel only)")
    if tp is not None and tp != engine_tp:
        raise ConfigError(f"--tp {tp} but the engine was built for tp {engine_tp} (engine/config.json mapping): "
                          "TensorRT-LLM runs an engine on exactly the GPUs it was split for",
                          fix=f"use --tp {engine_tp}, or convert and compile the model again with tp {tp}")
    if not repo_path.startswith("/"):
        raise ConfigError(f"--repo-path {repo_path!r} must be absolute (Triton and its Python models open these "
                          "paths from their own working directory)", fix="use e.g. --repo-path /models")
    if instances < 1 or max_queue_size < 0:
        raise ConfigError("--instances must be >= 1 and --max-queue-size >= 0", fix="use e.g. --instances 5")
    image = triton_image or _known_image(version, required=k8s)
    values = fill_values(manifest, engine_cfg, bundle, engine_tp, instances, streaming, repo_path, max_queue_size)
    configs = model_configs(values)
    with atomic_output_dir(out, force) as tmp:
        for model, cfg in configs.items():
            (tmp / model / "1").mkdir(parents=True)
            (tmp / model / "config.pbtxt").write_text(f"# written by trt-gemma export-triton from {bundle.name}\n"
                                                      + to_pbtxt(cfg) + "\n")
        if log:
            log(f"linking/copying the engine ({mf.dir_bytes(engine) / 2**30:.2f} GiB)")
        _copy_tree(bundle, engine, tmp / "tensorrt_llm" / "1" / "engine")
        tok_src = bundle / "checkpoint" if (bundle / "checkpoint" / "tokenizer.json").is_file() else engine
        _copy_tree(bundle, tok_src, tmp / "tensorrt_llm" / "1" / "tokenizer", TOKENIZER_FILES)
        record = {"format": "trt_gemma.triton/1", "created_utc": mf.now_utc(), "bundle": str(bundle.resolve()),
                  "model": (manifest.get("model") or {}).get("id"), "target": (manifest.get("target") or {}).get("name"),
                  "trtllm_version": version, "tp": engine_tp, "values": values, "triton_image": image or None,
                  "templates": "NVIDIA/TensorRT-LLM triton_backend/all_models/inflight_batcher_llm@0c8de69a"}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        k8s_file = None
        if k8s:
            from trt_gemma.deploy.k8s import TRITON_AUTH_NOTE, dump_yaml, triton_manifests

            docs = triton_manifests(name or _k8s_name(manifest), image, engine_tp, repo_path,
                                    repo_bytes=mf.dir_bytes(tmp))
            (tmp / K8S_FILE).write_text(TRITON_AUTH_NOTE + dump_yaml(docs))
            k8s_file = out / K8S_FILE
    return ExportResult(out, bundle, values, engine_tp, version, k8s_file, image or None)


def _known_image(version: str, required: bool) -> str:
    """The Triton image of the engine's TensorRT-LLM; unknown is an error only where the image is written (--k8s)."""
    from trt_gemma.deploy.k8s import triton_image_for

    try:
        return triton_image_for(version)
    except ConfigError:
        if required:
            raise
        return ""


def _k8s_name(manifest: dict) -> str:
    """A DNS-1123 label (Kubernetes object names): triton-<model dir or hub name>."""
    model = Path(str((manifest.get("model") or {}).get("id") or "gemma").rstrip("/")).name
    return ("triton-" + re.sub(r"[^a-z0-9-]+", "-", model.lower())).strip("-")[:50].rstrip("-")


def next_steps(out: Path, tp: int, repo_path: str, k8s: bool, streaming: bool = False,
               image: str | None = None) -> list[str]:
    """How to run it: the Python models' 1/model.py come from the container (tensorrtllm_backend README: the
    container ships all_models under /app), then tritonserver; tp > 1 runs in orchestrator mode (one tritonserver
    that spawns a worker per GPU: TRTLLM_ORCHESTRATOR=1, launch_triton_server.py --multi-model)."""
    from trt_gemma.deploy.k8s import TRITON_IMAGE, copy_model_py_script, triton_command

    run = " ".join(triton_command(tp, repo_path))
    env = " -e TRTLLM_ORCHESTRATOR=1" if tp > 1 else ""
    steps = [f"docker run --rm --gpus all --shm-size=2g -p 8000:8000 -p 8001:8001 -p 8002:8002{env} "
             f"-v {out.resolve()}:{repo_path} {image or TRITON_IMAGE.format(tag='<yy.mm>')} bash -c '{copy_model_py_script(repo_path)} && {run}'"]
    body = '{"text_input": "Hello", "max_tokens": 32%s}' % (', "stream": true' if streaming else "")
    steps.append(f"curl -s localhost:8000/v2/models/ensemble/generate{'_stream' if streaming else ''} -d '{body}'")
    if k8s:
        steps.insert(0, f"kubectl apply -f {out / K8S_FILE}  (then copy {out} into the model-repository volume)")
    return steps
