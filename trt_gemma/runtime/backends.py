"""Serving backends behind one interface (base.Backend), chosen by what a model directory holds.

  build bundle             (manifest.json + checkpoint/)                      -> its tensorrt/model.engine where this
                                                                                host runs it (engine_backend), else
                                                                                its onnx/ on a GPU provider, its
                                                                                engine/ with TensorRT-LLM, or its
                                                                                checkpoint/
  TensorRT-LLM engine dir  (config.json with "build_config" + rank0.engine)   -> TensorRT-LLM backend (GPU host)
  TensorRT-LLM checkpoint  (config.json with "architecture" + rank0.safetensors) -> reference numpy runtime
  Hugging Face Gemma 2 dir (config.json with "model_type"/"architectures")   -> converted once into a cache
                                                                                (see `converted_cache_dir`), then
                                                                                the reference runtime

  ONNX export dir          (trt_gemma_onnx.json + model.onnx)                 -> onnxruntime backend

On-the-fly conversion is what lets `trt-gemma serve` (no argument: the embedded HF-format model) just work. Cache
entries are keyed by content (runtime/cache.py: our version plus every file's bytes), so an edited model converts
again, the same model is cached once wherever it is installed, and the cache stays under its size cap (LRU).

Which CPU runtime runs a checkpoint is the `backend` choice: "auto" (the default) takes onnxruntime when it and the
onnx package are installed, exporting the checkpoint once into an ONNX cache beside the checkpoint cache
(`onnx_cache_dir`), else the numpy reference; "reference" / "onnxruntime" force one; "trtllm" needs an engine.
"""
from __future__ import annotations

import functools
from pathlib import Path

from trt_gemma.runtime.base import (Backend, GenerationParams, KVUsage, MemoryFootprint, ModelInfo,  # noqa: F401
                                     Step)
from trt_gemma.errors import ConfigError, InputError
from trt_gemma.runtime import cache
from trt_gemma.safe_io import check_tree, read_json_object

# kind -> (predicate on (dir, config dict)); first match wins, most specific first.
KINDS = (
    ("trtllm_engine", lambda d, c: "build_config" in c and (d / "rank0.engine").is_file()),
    ("trtllm_checkpoint", lambda d, c: "architecture" in c and (d / "rank0.safetensors").is_file()),
    ("hf", lambda d, c: ("model_type" in c or "architectures" in c) and any(d.glob("*.safetensors"))),
)


BACKENDS = ("auto", "reference", "onnxruntime", "trtllm")
# Cached exports use the pool layout: the onnxruntime backend runs the batched step loop over a KV pool it owns
# (runtime/steploop.py, docs/onnx.md); `export-onnx` defaults to the standard concat layout.
ONNX_KV_CACHE = "pool"
ONNX_LOGITS = "last"  # generation reads the last position only: the graph's norm + lm_head run on one row
# Cached exports use opset 23 (RMSNormalization and RotaryEmbedding: 292 -> 188 nodes on the embedded model, ~6%
# faster decode on the CPU EP, benchmarks/cpu_decode.py) where the installed onnxruntime has kernels for both (probed:
# older releases lack them), else opset 21: the same math in more nodes.
ONNX_FAST_OPSET = 23
# Records of when and where a checkpoint was made: not part of what it is (nor of its cache key).
PROVENANCE_FILES = ("trt_gemma_provenance.json", "manifest.json")


def detect_kind(path: Path) -> str:
    """What `path` holds (KINDS); the one way in for model dirs: the whole dir passes safe_io.check_tree first."""
    path = Path(path)
    if path.is_dir():
        check_tree(path)
    if (path / "trt_gemma_onnx.json").is_file():
        return "onnx"
    if (path / "manifest.json").is_file() and (path / "checkpoint" / "config.json").is_file():
        return "bundle"
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} has no config.json: not a model dir",
                         fix="pass a Hugging Face Gemma 2 dir, a `trt-gemma convert` checkpoint or an engine dir")
    cfg = read_json_object(cfg_path, fix="re-create or re-download the model")
    for kind, matches in KINDS:
        if matches(path, cfg):
            return kind
    raise InputError(f"{path} is neither an HF model, a TensorRT-LLM checkpoint nor an engine dir "
                     "(no *.safetensors / rank0.safetensors / rank0.engine next to config.json)",
                     fix="point at the directory that holds the weights")


def load_backend(model_path: str | Path, *, slots: int = 1, cache_dir: Path | None = None,
                 backend: str = "auto", device: str = "cpu", prefill_chunk: int | None = None) -> Backend:
    """Load the right backend for `model_path`; `slots` sizes the KV budget (the server's max concurrency);
    `device` is onnxruntime's (cpu, cuda, tensorrt: runtime/providers.py); `prefill_chunk`: prompt tokens per engine
    turn of a step-loop backend (None: its default)."""
    step = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
    path = Path(model_path)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}", fix="use --backend auto")
    if device != "cpu" and backend not in ("auto", "onnxruntime"):
        raise ConfigError(f"--device {device} is onnxruntime's; --backend {backend} does not take it",
                          fix="use --backend onnxruntime")
    kind = detect_kind(path)
    if kind == "bundle":
        why = (engine_unavailable(path) if backend == "auto" and device == "cpu"
               else f"--backend {backend} --device {device} was asked for")
        if why is None:
            from trt_gemma.runtime.engine_backend import TensorRTBackend

            return TensorRTBackend.load(path, slots=slots, **step)  # its `choice` names the engine's builder
        loaded = _bundle_backend(path, slots, cache_dir, backend, device, prefill_chunk)
        loaded.choice = f"its TensorRT engine is not used: {why}"
        return loaded
    if kind == "trtllm_engine":  # raises DependencyError with the fix where there is no GPU / tensorrt_llm
        from trt_gemma.runtime.trtllm import TrtLlmBackend

        return TrtLlmBackend.load(path, slots=slots)
    if backend == "trtllm":
        raise InputError(f"{path} is not a TensorRT-LLM engine: --backend trtllm runs engines",
                         fix="build one with `trt-gemma build`, or use --backend auto")
    if kind == "onnx":
        if backend == "reference":
            raise InputError(f"{path} is an ONNX export: the reference runtime runs checkpoints",
                             fix="pass the checkpoint it was exported from, or use --backend onnxruntime")
        from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend.load(path, slots=slots, device=device, **step)
    if kind == "hf":
        path = ensure_converted(path, cache_dir)
    if backend == "onnxruntime" or (backend == "auto" and (onnxruntime_available() or device != "cpu")):
        from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend

        loaded: Backend = OnnxRuntimeBackend.load(ensure_onnx(path, cache_dir), slots=slots, source=path,
                                                  device=device, **step)
    else:
        from trt_gemma.runtime.reference import ReferenceBackend

        loaded = ReferenceBackend.load(path, slots=slots)
    if kind == "hf":  # name the model after what the user passed, not the cache entry
        loaded.info = ModelInfo(**{**loaded.info.__dict__, "name": Path(model_path).name})
    return loaded


def _bundle_backend(path: Path, slots: int, cache_dir, backend: str, device: str, prefill_chunk) -> Backend:
    """A bundle on what this host runs without its TensorRT engine: the bundle's graph on an onnxruntime GPU
    provider, its TensorRT-LLM engine where one runs, else its checkpoint on a CPU backend."""
    if device != "cpu" and (path / "onnx" / "trt_gemma_onnx.json").is_file():
        # on the GPU, the bundle's own graph with its recipe's profiles (TensorRT EP caches kept in the bundle)
        from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend
        from trt_gemma.runtime.providers import bundle_limits

        return OnnxRuntimeBackend.load(path / "onnx", slots=slots, source=path, device=device,
                                       limits=bundle_limits(path))
    if backend in ("reference", "onnxruntime"):  # a CPU runtime asked for: the bundle's checkpoint
        return load_backend(path / "checkpoint", slots=slots, cache_dir=cache_dir, backend=backend, device=device,
                            prefill_chunk=prefill_chunk)
    return load_backend(bundle_runnable(path), slots=slots, cache_dir=cache_dir, backend=backend, device=device,
                        prefill_chunk=prefill_chunk)


def onnxruntime_available() -> bool:
    """onnxruntime runs the graph and onnx writes it: both make onnxruntime the default CPU backend."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def onnx_cache_dir(ckpt: Path, cache_dir: Path | None = None) -> Path:
    """Where the ONNX export of checkpoint `ckpt` is cached: `onnx/` beside the converted-checkpoint cache, keyed
    by our version, the layout and its contract revision, the export options and the contents of the checkpoint's
    config, weight and tokenizer files (its provenance records when and where it was made, so it stays out of the key)."""
    from trt_gemma import __version__
    from trt_gemma.onnx.pool import CONTRACT

    seed = f"{__version__}:{ONNX_KV_CACHE}:{CONTRACT}:{ONNX_LOGITS}:{onnx_cache_opset()}"
    return export_cache_dir("onnx", ckpt, seed, cache_dir)


def export_cache_dir(namespace: str, ckpt: Path, seed: str, cache_dir: Path | None = None) -> Path:
    """The cache entry of an export of checkpoint `ckpt` under `namespace`, keyed by `seed` and the contents of the
    checkpoint's config, weight and tokenizer files (not its provenance records)."""
    root = Path(cache_dir).parent if cache_dir else cache.cache_root()
    files = [p for p in Path(ckpt).iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")
             and p.name not in PROVENANCE_FILES]
    return cache.entry_path(root / namespace, Path(ckpt), seed, files)


@functools.lru_cache(maxsize=None)
def onnx_cache_opset() -> int:
    """The opset of the onnxruntime backend's own exports: ONNX_FAST_OPSET where the installed onnx knows it and
    onnxruntime opens a graph of its two operators (one tiny session, once per process), else MIN_OPSET."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from trt_gemma.onnx.export import MIN_OPSET

    if onnx.defs.onnx_opset_version() < ONNX_FAST_OPSET:
        return MIN_OPSET
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("RMSNormalization", ["x", "w"], ["n"]),
             helper.make_node("RotaryEmbedding", ["n", "cos", "sin", "pos"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", f32, [1, 1, 1, 4]), helper.make_tensor_value_info("pos", i64, [1, 1])]
    weights = [helper.make_tensor("w", f32, [4], [1.0] * 4), helper.make_tensor("cos", f32, [1, 2], [1.0] * 2),
               helper.make_tensor("sin", f32, [1, 2], [0.0] * 2)]
    graph = helper.make_graph(nodes, "probe", inputs, [helper.make_tensor_value_info("y", f32, [1, 1, 1, 4])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_FAST_OPSET)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any refusal (NOT_IMPLEMENTED, invalid graph) means: not this onnxruntime
        return MIN_OPSET
    return ONNX_FAST_OPSET


def ensure_onnx(ckpt: Path, cache_dir: Path | None = None) -> Path:
    """The ONNX export of checkpoint `ckpt`, exporting into the cache on first use (atomic: no half-written entry)."""
    if not onnxruntime_available():
        from trt_gemma.errors import DependencyError

        raise DependencyError("the onnxruntime backend needs the onnx and onnxruntime packages",
                              fix="pip install 'trt-gemma[onnx]', or use --backend reference")
    return export_into(onnx_cache_dir(ckpt, cache_dir), ckpt, kv_cache=ONNX_KV_CACHE, logits=ONNX_LOGITS)


def export_into(out: Path, ckpt: Path, **options) -> Path:
    """Cache entry `out`, exporting checkpoint `ckpt` into it (at `onnx_cache_opset`) on first use: under the entry's
    lock, so no half-written entry and no second export by another process or thread; then marked used."""
    if not (out / "trt_gemma_onnx.json").is_file():
        from trt_gemma.onnx.export import export_onnx

        with cache.entry_lock(out):
            if not (out / "trt_gemma_onnx.json").is_file():  # another process or thread may have made it meanwhile
                export_onnx(ckpt, out, opset=onnx_cache_opset(), force=True, show_progress=False, **options)
    cache.admit(out, ckpt)
    return out


def engine_unavailable(bundle: Path) -> str | None:
    """Why `serve BUNDLE` does not run BUNDLE/tensorrt/model.engine here (None: it does, on the TensorRT backend):
    no engine built, or the engine's builder, cuda-python or a GPU missing (runtime/tensorrt.unavailable_reason)."""
    from trt_gemma.runtime.tensorrt import ENGINE_FILE, read_record, unavailable_reason

    engine = Path(bundle) / "tensorrt" / ENGINE_FILE
    if not engine.is_file():
        return f"no TensorRT engine: {engine} is missing (trt-gemma build --from-bundle {bundle} --engine tensorrt)"
    try:
        builder = read_record(Path(bundle)).get("builder")
    except InputError as e:  # its build record is missing or unreadable: the engine cannot be checked, so not run
        return e.message
    why = unavailable_reason(builder)
    return None if why is None else f"the engine cannot run on this host: {why}"


def bundle_runnable(bundle: Path) -> Path:
    """The engine of a compiled bundle where this host can run it (tensorrt_llm + a GPU), else its checkpoint."""
    from trt_gemma.gpu_probe import gpu_unavailable_reason

    engine = Path(bundle) / "engine"
    if (engine / "rank0.engine").is_file() and gpu_unavailable_reason() is None:
        return engine
    return Path(bundle) / "checkpoint"


def reference_checkpoint(model_path: str | Path, cache_dir: Path | None = None) -> Path:
    """A TensorRT-LLM checkpoint dir the numpy reference runtime can run, from a checkpoint, a bundle (its
    checkpoint/) or an HF dir (converted once into the cache). Engines are GPU-only."""
    path = Path(model_path)
    kind = detect_kind(path)
    if kind == "bundle":
        return path / "checkpoint"
    if kind == "hf":
        return ensure_converted(path, cache_dir)
    if kind == "trtllm_engine":
        raise InputError(f"{path} is a TensorRT engine: the reference runtime runs checkpoints",
                         fix=f"use its bundle's checkpoint/ here, or `trt-gemma serve {path}` on a GPU host")
    return path


def converted_cache_dir(hf_dir: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted checkpoint of HF dir `hf_dir` is cached, keyed by our version and its files' contents."""
    from trt_gemma import __version__

    base = Path(cache_dir) if cache_dir else cache.cache_root() / "checkpoints"
    return cache.entry_path(base, Path(hf_dir), __version__, [p for p in Path(hf_dir).iterdir() if p.is_file()])


def ensure_converted(hf_dir: Path, cache_dir: Path | None = None) -> Path:
    """The TRT-LLM checkpoint for `hf_dir`, converting into the cache on first use (atomic: no half-written entry)."""
    out = converted_cache_dir(hf_dir, cache_dir)
    if not (out / "config.json").is_file():
        from trt_gemma.checkpoint.convert import convert_checkpoint

        with cache.entry_lock(out):
            if not (out / "config.json").is_file():  # another process or thread may have made it meanwhile
                convert_checkpoint(hf_dir, out, dtype=None)  # keep the source dtype: serving must match the HF model
    cache.admit(out)
    return out
