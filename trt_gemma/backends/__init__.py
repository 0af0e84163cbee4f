"""Serving backends behind one interface (base.Backend), chosen by what a model directory holds.

  build bundle             (manifest.json + checkpoint/)                      -> its engine/ on a GPU host with
                                                                                TensorRT-LLM, else its checkpoint/
  TensorRT-LLM engine dir  (config.json with "build_config" + rank0.engine)   -> TensorRT-LLM backend (GPU host)
  TensorRT-LLM checkpoint  (config.json with "architecture" + rank0.safetensors) -> reference numpy runtime
  Hugging Face Gemma 2 dir (config.json with "model_type"/"architectures")   -> converted once into a cache
                                                                                (see `converted_cache_dir`), then
                                                                                the reference runtime

On-the-fly conversion is what lets `trt-gemma serve` (no argument: the embedded HF-format model) just work. The cache
key hashes the HF config plus every file's name, size and mtime and our version, so an edited model converts again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trt_gemma.backends.base import (Backend, GenerationParams, KVUsage, MemoryFootprint, ModelInfo,  # noqa: F401
                                     Step)
from trt_gemma.errors import InputError

# kind -> (predicate on (dir, config dict)); first match wins, most specific first.
KINDS = (
    ("trtllm_engine", lambda d, c: "build_config" in c and (d / "rank0.engine").is_file()),
    ("trtllm_checkpoint", lambda d, c: "architecture" in c and (d / "rank0.safetensors").is_file()),
    ("hf", lambda d, c: ("model_type" in c or "architectures" in c) and any(d.glob("*.safetensors"))),
)


def detect_kind(path: Path) -> str:
    path = Path(path)
    if (path / "manifest.json").is_file() and (path / "checkpoint" / "config.json").is_file():
        return "bundle"
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} has no config.json: not a model dir",
                         fix="pass a Hugging Face Gemma 2 dir, a `trt-gemma convert` checkpoint or an engine dir")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path} is not readable JSON ({e})", fix="re-create or re-download the model") from e
    for kind, matches in KINDS:
        if matches(path, cfg):
            return kind
    raise InputError(f"{path} is neither an HF model, a TensorRT-LLM checkpoint nor an engine dir "
                     "(no *.safetensors / rank0.safetensors / rank0.engine next to config.json)",
                     fix="point at the directory that holds the weights")


def load_backend(model_path: str | Path, *, slots: int = 1, cache_dir: Path | None = None) -> Backend:
    """Load the right backend for `model_path`; `slots` sizes the KV budget (the server's max concurrency)."""
    path = Path(model_path)
    kind = detect_kind(path)
    if kind == "bundle":
        return load_backend(bundle_runnable(path), slots=slots, cache_dir=cache_dir)
    if kind == "trtllm_engine":  # raises DependencyError with the fix where there is no GPU / tensorrt_llm
        from trt_gemma.backends.trtllm import TrtLlmBackend

        return TrtLlmBackend.load(path, slots=slots)
    if kind == "hf":
        path = ensure_converted(path, cache_dir)
    from trt_gemma.backends.reference import ReferenceBackend

    backend = ReferenceBackend.load(path, slots=slots)
    if kind == "hf":  # name the model after what the user passed, not the cache entry
        backend.info = ModelInfo(**{**backend.info.__dict__, "name": Path(model_path).name})
    return backend


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
    from trt_gemma import __version__

    base = cache_dir or Path(os.environ.get("TRT_GEMMA_CACHE", Path.home() / ".cache" / "trt_gemma")) / "checkpoints"
    h = hashlib.sha256(__version__.encode())
    for f in sorted(p for p in Path(hf_dir).iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((Path(hf_dir) / "config.json").read_bytes())
    return Path(base) / f"{Path(hf_dir).resolve().name}-{h.hexdigest()[:16]}"


def ensure_converted(hf_dir: Path, cache_dir: Path | None = None) -> Path:
    """The TRT-LLM checkpoint for `hf_dir`, converting into the cache on first use (atomic: no half-written entry)."""
    out = converted_cache_dir(hf_dir, cache_dir)
    if (out / "config.json").is_file():
        return out
    from trt_gemma.convert import convert_checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    convert_checkpoint(hf_dir, out, dtype=None)  # keep the source dtype: serving must match the HF model
    return out
