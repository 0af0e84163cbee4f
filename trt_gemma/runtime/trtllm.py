"""Backend over a TensorRT-LLM engine (ModelRunnerCpp, the C++ executor behind TRT-LLM's own `examples/run.py`).

Facts from docs/tensorrt-llm-contract.md §6: `ModelRunnerCpp.from_dir(engine_dir, rank=0, max_batch_size=,
kv_cache_free_gpu_memory_fraction=, max_tokens_in_paged_kv_cache=, ...)`; `generate(batch_input_ids: List[Tensor],
max_new_tokens=, end_id=, pad_id=, streaming=True, return_dict=True, output_sequence_lengths=True, top_k=, top_p=,
temperature=, random_seed=)` yields dicts whose `output_ids` [batch, beams, seq] hold prompt + tokens so far; KV stats
come from the executor's `get_latest_iteration_stats()` (`kv_cache_stats.max_num_blocks/used_num_blocks/
tokens_per_block`). The executor is `runner.session` in the reference's sources and `runner.executor` in
TRT runtime/model_runner_cpp.py@0383291; both are looked up.

One generation at a time: ModelRunnerCpp's streaming loop calls `executor.await_responses()` for ALL requests
(model_runner_cpp.py `_stream`), so two concurrent `generate` calls would steal each other's tokens. The server's
admission queue holds the others; in-flight batching across requests would need the LLM API instead.

Stop tokens: Gemma IT models end turns with <end_of_turn> while the tokenizer's eos is <eos> (§6). Both are looked up
by name in the tokenizer; <end_of_turn> goes to the engine as `end_id`, <eos> is checked here per step.

Imports are guarded: tensorrt_llm is imported only after gpu_probe says a GPU and the package are present
(`import tensorrt_llm` fails without libcuda, TensorRT crashes without a GPU — docs/tensorrt-llm-contract.md §0).
Only `@pytest.mark.gpu` tests run this module.
"""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from trt_gemma.runtime.base import Backend, GenerationParams, KVUsage, MemoryFootprint, ModelInfo, Step
from trt_gemma.errors import DependencyError, InputError
from trt_gemma.quant.formats import KV_BYTES
from trt_gemma.safe_io import read_json, read_json_object

ENGINE_MANIFEST = "manifest.json"  # written beside config.json/rank0.engine by trt_gemma.build.compile_bundle


def is_engine_dir(path: Path) -> bool:
    """A TRT-LLM engine dir: config.json with `pretrained_config` + `build_config` and a rank0.engine (§5)."""
    path = Path(path)
    if not (path / "rank0.engine").is_file() or not (path / "config.json").is_file():
        return False
    try:
        cfg = read_json(path / "config.json")
    except InputError:
        return False
    return isinstance(cfg, dict) and "build_config" in cfg and "pretrained_config" in cfg


def read_engine_config(path: Path) -> dict:
    path = Path(path)
    cfg = read_json_object(path / "config.json",
                           fix="point at the engine dir written by `trt-gemma build` (BUNDLE/engine)")
    if "build_config" not in cfg or "pretrained_config" not in cfg:
        raise InputError(f"{path / 'config.json'} has no build_config/pretrained_config: not an engine dir",
                         fix="compile it first: trt-gemma build --from-bundle BUNDLE")
    return cfg


def runtime_kv_settings(path: Path) -> dict:
    """ModelRunnerCpp KV arguments from the recipe recorded in the engine's manifest (defaults: TRT-LLM's own).

    On unified memory (Jetson) the default 0.9 of free memory starves the host, so recipes there cap the pool in
    tokens too (`kv_cache_max_tokens`, docs/facts/jetson.md §5); TRT-LLM uses the
    smaller of the two limits (§6 KvCacheConfig).
    """
    manifest = Path(path) / ENGINE_MANIFEST
    recipe = read_json_object(manifest).get("recipe", {}) if manifest.is_file() else {}
    out = {}
    if recipe.get("kv_cache_free_gpu_memory_fraction"):
        out["kv_cache_free_gpu_memory_fraction"] = float(recipe["kv_cache_free_gpu_memory_fraction"])
    if int(recipe.get("kv_cache_max_tokens") or 0) > 0:
        out["max_tokens_in_paged_kv_cache"] = int(recipe["kv_cache_max_tokens"])
    return out


def tokenizer_dir(path: Path) -> Path:
    """The engine dir when `trt-gemma build` copied the tokenizer there; after a raw `trtllm-build` into
    BUNDLE/engine, the bundle's checkpoint beside it."""
    path = Path(path)
    for cand in (path, path.parent / "checkpoint"):
        if (cand / "tokenizer.json").is_file():
            return cand
    raise InputError(f"no tokenizer.json in {path} or {path.parent / 'checkpoint'}",
                     fix="copy the tokenizer files (tokenizer.json, tokenizer_config.json) into the engine dir")


def attention_windows(pretrained: dict, max_seq_len: int) -> list[int] | None:
    """Per-layer `max_attention_window_size` for ModelRunnerCpp, or None when no layer's window is below max_seq_len.

    TensorRT-LLM's Gemma 2 model marks no layer as sliding (models/gemma/config.py keeps no `sliding_window` for
    Gemma 2): the window exists only as this run-time argument, a list with one entry per layer, as TensorRT-LLM's
    Gemma 3 README passes it (docs/tensorrt-llm-contract.md §6). Our checkpoint records HF's window and layer
    types under `trt_gemma` (convert.EXTRA_KEY), which TensorRT-LLM carries into the engine's pretrained_config. For
    real Gemma 2 (window 4096, max_seq_len <= 4096) nothing changes; a model with a smaller window (the embedded one:
    128) would otherwise attend globally past the window and diverge from the reference."""
    ours = pretrained.get("trt_gemma") or {}
    window, types = ours.get("sliding_window"), ours.get("layer_types")
    if not window or not types or int(window) >= max_seq_len:
        return None
    return [int(window) if t == "sliding_attention" else max_seq_len for t in types]


def runner_kwargs(path: Path, cfg: dict, slots: int = 1) -> dict:
    """Everything `ModelRunnerCpp.from_dir` gets for this engine dir (built without importing TensorRT-LLM)."""
    build = cfg["build_config"]
    kw = {"engine_dir": str(path), "rank": 0, "max_batch_size": max(1, min(slots, int(build["max_batch_size"]))),
          **runtime_kv_settings(path)}
    pretrained = cfg["pretrained_config"]
    if "trt_gemma" not in pretrained:  # an engine whose config dropped our block: the bundle's checkpoint beside it
        pretrained = {"trt_gemma": _checkpoint_block(Path(path))}
    windows = attention_windows(pretrained, int(build["max_seq_len"]))
    if windows is not None:
        kw["max_attention_window_size"] = windows
    return kw


def _checkpoint_block(engine_dir: Path) -> dict:
    """Our `trt_gemma` config block from BUNDLE/checkpoint/config.json when the engine sits in BUNDLE/engine."""
    cfg = engine_dir.parent / "checkpoint" / "config.json"
    try:
        return read_json_object(cfg).get("trt_gemma") or {} if cfg.is_file() else {}
    except InputError:
        return {}


def sampling_kwargs(params: GenerationParams) -> dict:
    """ModelRunnerCpp sampling kwargs (docs/tensorrt-llm-contract.md §6). Greedy = top_k 1. When sampling,
    top_p is always sent as a float (1.0 = no nucleus cut, a valid value): with top_k 0 and top_p unset the
    executor's defaults decode greedily and the temperature is ignored."""
    if params.temperature <= 0.0:
        kw = {"top_k": 1, "temperature": 1.0, "top_p": None}
    else:
        kw = {"top_k": int(params.top_k or 0), "temperature": float(params.temperature), "top_p": float(params.top_p)}
    if params.seed is not None:
        kw["random_seed"] = int(params.seed)
    return kw


def _kv_bytes_per_token(pretrained: dict) -> int:
    quant = pretrained.get("quantization") or {}
    kv = {"FP8": "fp8", "INT8": "int8"}.get(str(quant.get("kv_cache_quant_algo")), pretrained.get("dtype", "bfloat16"))
    head = pretrained.get("head_size") or pretrained["hidden_size"] // pretrained["num_attention_heads"]
    return 2 * pretrained["num_hidden_layers"] * pretrained["num_key_value_heads"] * head * KV_BYTES[kv]


def _require_gpu() -> None:
    from trt_gemma.gpu_probe import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        raise DependencyError(f"cannot serve a TensorRT-LLM engine here: {reason}",
                              fix="run on the GPU host the engine was built for, or serve the bundle's checkpoint "
                                  "dir with the reference backend: trt-gemma serve BUNDLE/checkpoint")


class TrtLlmBackend(Backend):
    name = "tensorrt_llm"

    def __init__(self, runner, tokenizer, info: ModelInfo, engine_cfg: dict, weights_bytes: int):
        self.runner, self.tokenizer, self.info = runner, tokenizer, info
        self._pretrained = engine_cfg["pretrained_config"]
        self._bytes_per_token = _kv_bytes_per_token(self._pretrained)
        self._weights_bytes = weights_bytes
        self._kv = KVUsage(0, 0, self._bytes_per_token)  # last iteration stats seen (the call drains them)
        self._lock = threading.Lock()  # guards _kv
        self._generate_lock = threading.Lock()  # one ModelRunnerCpp.generate at a time (see module docstring)

    @classmethod
    def load(cls, path: Path, *, slots: int = 1) -> "TrtLlmBackend":
        path = Path(path)
        cfg = read_engine_config(path)
        _require_gpu()
        from tensorrt_llm.runtime import ModelRunnerCpp  # guarded: GPU + package probed above

        from trt_gemma.runtime.tokenizer import GemmaTokenizer

        build = cfg["build_config"]
        runner = ModelRunnerCpp.from_dir(**runner_kwargs(path, cfg, slots))
        pre = cfg["pretrained_config"]
        quant = (pre.get("quantization") or {}).get("quant_algo")
        info = ModelInfo(name=path.parent.name if path.name == "engine" else path.name, path=str(path),
                         context_length=int(build["max_seq_len"]), vocab_size=int(pre["vocab_size"]),
                         dtype=str(pre.get("dtype", "bfloat16")), quant_algo=quant)
        weights = sum(p.stat().st_size for p in path.glob("rank*.engine"))
        return cls(runner, GemmaTokenizer.from_dir(tokenizer_dir(path)), info, cfg, weights)

    def _sampling_kwargs(self, params: GenerationParams) -> dict:
        return sampling_kwargs(params)

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams,
               cancel: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        prompt = list(prompt_ids)
        if len(prompt) + params.max_tokens > self.info.context_length:
            raise InputError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the engine's "
                             f"max_seq_len {self.info.context_length}", fix="shorten the prompt or lower max_tokens")
        with self._generate_lock:
            yield from self._stream_locked(prompt, params, cancel)

    def _stream_locked(self, prompt: list[int], params: GenerationParams, cancel: Callable[[], bool]) -> Iterator[Step]:
        import torch

        stops = () if params.ignore_eos else tuple(self.tokenizer.stop_token_ids)
        # ignore_eos: end_id -1 never matches, so the engine runs to max_tokens (what TRT-LLM's own LLM API sends:
        # `end_id=-1 if request.sampling_params.ignore_eos`, tensorrt_llm/executor/worker.py).
        end_id = -1 if params.ignore_eos else self.tokenizer.end_of_turn_id
        outputs = self.runner.generate([torch.tensor(prompt, dtype=torch.int32)], max_new_tokens=params.max_tokens,
                                       end_id=end_id, pad_id=self.tokenizer.eos_id, streaming=True, return_dict=True,
                                       output_sequence_lengths=True, **self._sampling_kwargs(params))
        try:
            yield from self._steps(outputs, prompt, params, stops, end_id, cancel)
        finally:
            # A request left running would hand its responses to the next generate() (await_responses takes
            # all of them): drain it to its end, bounded by max_tokens, before releasing the lock.
            with contextlib.suppress(Exception):
                for _ in outputs:
                    pass

    def _steps(self, outputs, prompt, params, stops, end_id, cancel) -> Iterator[Step]:
        decoder = self.tokenizer.incremental_decoder()
        seen, produced, t_last = len(prompt), 0, time.perf_counter()
        for out in outputs:
            self._poll_kv()
            length = int(out["sequence_lengths"][0][0])
            ids = out["output_ids"][0][0][seen:length].tolist()
            seen = max(seen, length)
            for tok in ids:
                now = time.perf_counter()
                step, t_last, produced = now - t_last, now, produced + 1
                if tok in stops:
                    yield Step(tok, decoder.flush(), step, produced == 1, "stop")
                    return
                if cancel():  # like the reference backend: the cancelled step carries no new text
                    yield Step(tok, decoder.flush(), step, produced == 1, "cancelled")
                    return
                text = decoder.push(tok)
                if produced >= params.max_tokens:
                    yield Step(tok, text + decoder.flush(), step, produced == 1, "length")
                    return
                yield Step(tok, text, step, produced == 1)
        # The engine stopped at end_id before max_tokens: it does not return the end token itself.
        yield Step(end_id, decoder.flush(), time.perf_counter() - t_last, produced == 0, "stop")

    def _executor(self):
        if self.runner is None:
            return None
        return getattr(self.runner, "executor", None) or getattr(self.runner, "session", None)

    def _poll_kv(self) -> None:
        """Fold the executor's latest iteration stats into the cached KV usage (telemetry reads the cache)."""
        executor = self._executor()
        if executor is None:
            return
        stats = executor.get_latest_iteration_stats()
        if not stats:
            return
        kv = stats[-1].kv_cache_stats
        with self._lock:
            self._kv = KVUsage(capacity_tokens=int(kv.max_num_blocks) * int(kv.tokens_per_block),
                               used_tokens=int(kv.used_num_blocks) * int(kv.tokens_per_block),
                               bytes_per_token=self._bytes_per_token)

    def kv_usage(self) -> KVUsage:
        self._poll_kv()
        with self._lock:
            return self._kv

    def memory(self) -> MemoryFootprint:
        kv = self.kv_usage()
        return MemoryFootprint(weights_bytes=self._weights_bytes, kv_used_bytes=kv.used_bytes,
                               kv_capacity_bytes=kv.capacity_bytes)

    def close(self) -> None:
        executor = self._executor()
        self.runner = None
        if executor is not None:
            executor.shutdown()
