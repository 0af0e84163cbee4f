"""onnxruntime backend: runs a `trt-gemma export-onnx` graph (CPU EP here; CUDA / TensorRT EPs where installed).

`OrtModel` has the reference model's generation interface (`new_cache`, `forward(ids, cache, last_only)`, `config`,
`weight_bytes`), so the reference's generation loop, sampler, cancellation and telemetry record
(trt_gemma/reference/generate.py) drive it unchanged, and the backend is the reference backend with another model.

The KV cache never leaves onnxruntime between steps: each step runs with IO binding, the `present.*` outputs are
allocated by onnxruntime and bound as the next step's `past_key_values.*` inputs as they are (OrtValues), so Python
copies only the new token ids in and the last logits row out. Quantized MatMuls run at
`session.qdq_matmulnbits_accuracy_level` 4 (int8 activations inside onnxruntime's fused MatMulNBits; the fastest CPU
path) unless asked otherwise; the tests use 0 (float32 activations, reference-exact).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trt_gemma.runtime.base import ModelInfo
from trt_gemma.runtime.batched import StepLoopBackend
from trt_gemma.runtime.pool import PoolShape
from trt_gemma.runtime.reference import ReferenceBackend
from trt_gemma.runtime.steploop import DEFAULT_PREFILL_CHUNK, StepLoop
from trt_gemma.errors import DependencyError, InputError

DEFAULT_ACCURACY_LEVEL = 4
SMALL_MODEL_BYTES = 64 << 20
DEFAULT_CAPACITY = 4096  # KV pool positions per slot (pool-layout exports; fewer where max_seq_len is shorter)
GROW_MIN = 64  # tokens: the first in-place KV buffer holds at least this many
# the export's activation dtype -> the numpy dtype of its KV cache (onnxruntime's CPU EP has no bfloat16 kernels)
KV_NUMPY = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class OrtConfig:
    """What the generation loop and the server read from a model's config (names as CheckpointConfig's)."""

    max_position_embeddings: int  # the export's max_seq_len
    vocab_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_size: int
    dtype: str
    quant_algo: str | None


class OrtCache:
    """One sequence's KV cache. "concat" graphs: the last step's present OrtValues (None before the first step).
    "inplace" graphs: one zeroed [1, kv_heads, capacity, head_size] buffer per past input, bound as both the past
    input and the present output, plus a decode binding whose token / position / logits buffers are numpy arrays
    shared with onnxruntime, so a decode step is one `run_with_iobinding` call."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.values: list | None = None
        self.arrays: list[np.ndarray] = []  # the numpy memory behind OrtValues made by ortvalue_from_numpy
        self.decode = None  # (binding, ids [1, 1], position [1], logits [1, 1, vocab]) of an inplace graph


def session_options(accuracy_level: int = DEFAULT_ACCURACY_LEVEL, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads:
        so.intra_op_num_threads = threads
    return so


class OrtModel:
    """An exported graph in an onnxruntime session. Thread-safe: the session is shared, caches are per call."""

    def __init__(self, path: Path, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, threads: int | None = None,
                 providers: list | None = None, ort_device: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise DependencyError("the onnxruntime backend needs onnxruntime",
                                  fix="pip install 'trt-gemma[onnx]', or use --backend reference") from e
        from trt_gemma.onnx.export import read_manifest

        self.path = Path(path)
        man = read_manifest(self.path)
        m = man["model"]
        self.config = OrtConfig(m["max_seq_len"], m["vocab_size"], m["num_hidden_layers"],
                                m["num_key_value_heads"], m["head_size"], m["dtype"], m["quant_algo"])
        self.manifest = man
        self.weight_bytes = int(man["external_bytes"])
        act = m.get("activation_dtype", "float32")
        if act not in KV_NUMPY:  # no bfloat16 CPU kernels, and numpy has no bfloat16 for the KV buffers
            raise InputError(f"{self.path} computes in {act}, which this backend cannot run",
                             fix="re-export with `trt-gemma export-onnx --activations float32` (or float16); "
                                 f"{act} graphs are for TensorRT")
        self.kv_dtype = KV_NUMPY[act]
        self.kv_bytes_per_token = (2 * m["num_hidden_layers"] * m["num_key_value_heads"] * m["head_size"]
                                   * np.dtype(self.kv_dtype).itemsize)
        if threads is None and self.weight_bytes < SMALL_MODEL_BYTES:
            threads = 1  # splitting a tiny GEMV over threads costs more in synchronisation than it saves
        self.session = ort.InferenceSession(str(self.path / man["model_file"]),
                                            session_options(accuracy_level, threads),
                                            providers=providers or ["CPUExecutionProvider"])
        self.ort_device = ort_device  # where present KV stays between steps ("cuda": on the GPU, runtime/providers.py)
        self.inplace = m.get("kv_cache", "concat") == "inplace"
        self.all_logits = m.get("logits", "all") == "all"  # exports before the option returned every position
        self._past = [n for n in man["inputs"] if n.startswith("past_key_values.")]
        self._present = [n for n in man["outputs"] if n.startswith("present.")]
        self._empty = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, m["num_key_value_heads"], 0, m["head_size"]), self.kv_dtype))

    def new_cache(self, capacity: int = 512) -> OrtCache:
        if not 1 <= capacity <= self.config.max_position_embeddings:
            raise InputError(f"KV cache capacity {capacity} is outside 1..max_seq_len "
                             f"({self.config.max_position_embeddings}) of {self.path}",
                             fix="ask for fewer prompt + generated tokens, or re-export with a larger --max-seq-len")
        return OrtCache(capacity)

    def forward(self, ids, cache: OrtCache | None = None, last_only: bool = False) -> np.ndarray:
        """Logits [T, vocab] (or [1, vocab] with last_only) for token ids [T] / [1, T]; appends them to `cache`."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 1 and cache is not None and cache.decode is not None and \
                0 <= ids[0, 0] < self.config.vocab_size and cache.length < cache.arrays[0].shape[2]:
            return self._decode_step(int(ids[0, 0]), cache)  # the per-token path, checked in scalars
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InputError(f"token ids must be non-empty and in 0..{self.config.vocab_size - 1}",
                             fix="use the model's own tokenizer")
        if not (last_only or self.all_logits or ids.shape[1] == 1):
            raise InputError(f"{self.path} returns the last position's logits only, and logits for all {ids.shape[1]} "
                             "tokens were asked for", fix="re-export with `trt-gemma export-onnx --logits all`")
        cache = cache if cache is not None else self.new_cache(ids.shape[1])
        if cache.length + ids.shape[1] > cache.capacity:
            raise InputError(f"KV cache overflow: {cache.length} cached + {ids.shape[1]} new tokens > capacity "
                             f"{cache.capacity}", fix="create the cache with a larger capacity")
        logits = self._step_inplace(ids, cache) if self.inplace else self._step_concat(ids, cache)
        cache.length += ids.shape[1]
        return logits[-1:] if last_only else logits

    def _step_concat(self, ids: np.ndarray, cache: OrtCache) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        for i, name in enumerate(self._past):
            binding.bind_ortvalue_input(name, self._empty if cache.values is None else cache.values[i])
        binding.bind_output("logits", "cpu")
        for name in self._present:
            binding.bind_output(name, self.ort_device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        cache.values = outs[1:]  # stays inside onnxruntime: next step's past
        return outs[0].numpy()[0]

    def _step_inplace(self, ids: np.ndarray, cache: OrtCache) -> np.ndarray:
        need = cache.length + ids.shape[1]
        if cache.values is None or need > cache.arrays[0].shape[2]:
            self._grow(cache, need)
        if ids.shape[1] == 1 and cache.decode is None:
            cache.decode = self._decode_binding(cache)
        if ids.shape[1] == 1:
            logits = self._decode_step(int(ids[0, 0]), cache)
            cache.length -= 1  # forward() counts it
            return logits
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
        self._bind_buffers(cache, binding)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("past_length", np.array([cache.length], np.int64))
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0]

    def _decode_step(self, token: int, cache: OrtCache) -> np.ndarray:
        """One token through the cache's decode binding: two scalars written into bound numpy memory, one run, the
        logits row copied out (the hot loop of generation: ~20 us of Python around the run before, ~10 now)."""
        binding, ids_buf, pos_buf, logits_buf = cache.decode
        ids_buf[0, 0], pos_buf[0] = token, cache.length
        self.session.run_with_iobinding(binding)
        cache.length += 1
        return logits_buf[0].copy()

    def _grow(self, cache: OrtCache, need: int) -> None:
        """(Re)allocate the buffers for at least `need` tokens, doubling (attention reads the whole buffer, so it
        stays within 2x the tokens held instead of the request's full capacity); the rows so far are copied."""
        import onnxruntime as ort

        c, old = self.config, cache.arrays[:len(self._past)]
        size = min(cache.capacity, max(need, GROW_MIN, 2 * (old[0].shape[2] if old else 0)))
        cache.arrays = [np.zeros((1, c.num_key_value_heads, size, c.head_size), self.kv_dtype) for _ in self._past]
        for new, prev in zip(cache.arrays, old):
            new[:, :, :prev.shape[2]] = prev
        cache.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in cache.arrays]
        cache.decode = None  # its binding points at the old buffers

    def _bind_buffers(self, cache: OrtCache, binding=None):
        """Each layer's buffer bound as its past input and its present output: written in place."""
        binding = binding or self.session.io_binding()
        for past, present, value in zip(self._past, self._present, cache.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def _decode_binding(self, cache: OrtCache):
        import onnxruntime as ort

        ids_buf, pos_buf = np.zeros((1, 1), np.int64), np.zeros(1, np.int64)
        logits_buf = np.zeros((1, 1, self.config.vocab_size), np.float32)
        binding = self._bind_buffers(cache)
        for name, arr in (("input_ids", ids_buf), ("past_length", pos_buf)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits_buf))
        cache.arrays += [ids_buf, pos_buf, logits_buf]
        return binding, ids_buf, pos_buf, logits_buf


class OnnxRuntimeBackend(ReferenceBackend):
    """The reference backend's generation, KV accounting and cancellation over an onnxruntime model."""

    name = "onnxruntime"

    @classmethod
    def load(cls, path: Path, *, slots: int = 1, source: Path | None = None,
             accuracy_level: int = DEFAULT_ACCURACY_LEVEL, device: str = "cpu", limits=None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> "OnnxRuntimeBackend | OrtStepBackend":
        """`path`: an export dir; `source`: the checkpoint it was exported from (reported as the model path);
        `device`: cpu, cuda or tensorrt (runtime/providers.py picks the execution providers, the TensorRT EP's
        profiles from `limits`). A pool-layout export runs on the batched step loop (OrtStepBackend)."""
        from trt_gemma.onnx.export import read_manifest
        from trt_gemma.runtime.providers import for_export
        from trt_gemma.runtime.tokenizer import GemmaTokenizer

        path = Path(path)
        choice = None if device == "cpu" else for_export(device, path, slots, limits)
        providers = list(choice.providers) if choice else None
        if read_manifest(path)["model"].get("kv_cache") == "pool":
            return OrtStepBackend.load(path, slots=slots, source=source, accuracy_level=accuracy_level,
                                       prefill_chunk=prefill_chunk, providers=providers)
        model = OrtModel(path, accuracy_level=accuracy_level, threads=_threads(), providers=providers,
                         ort_device=choice.ort_device if choice else "cpu")
        c = model.config
        shown = Path(source) if source is not None else path
        info = ModelInfo(name=shown.name, path=str(shown), context_length=c.max_position_embeddings,
                         vocab_size=c.vocab_size, dtype=c.dtype, quant_algo=c.quant_algo)
        return cls(model, GemmaTokenizer.from_dir(path), info, slots=slots)


def _threads() -> int | None:
    """TRT_GEMMA_ORT_THREADS pins onnxruntime's intra-op threads (default: onnxruntime's own choice)."""
    v = os.environ.get("TRT_GEMMA_ORT_THREADS")
    return int(v) if v and v.isdigit() and int(v) > 0 else None


class PoolModel:
    """A pool-layout export as a model with the reference's `forward(ids, last_only=True)` for one-shot scoring (the
    guard's moderation): a fresh single-slot pool per call, run directly on the session."""

    def __init__(self, session, man: dict, kv_dtype):
        self.session, self.manifest, self.kv_dtype = session, man, kv_dtype
        self.weight_bytes = int(man["external_bytes"])

    def forward(self, ids, cache=None, last_only: bool = True) -> np.ndarray:
        if cache is not None or not last_only:
            raise InputError("a pool-layout graph scores the last position of a fresh sequence only",
                             fix="use an export with --kv-cache concat for cached or all-position forwards")
        m = self.manifest["model"]
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        feeds = {"input_ids": ids, "past_lengths": np.zeros(1, np.int64), "slot_ids": np.zeros(1, np.int64),
                 "past_positions": np.zeros(1, np.int64)}  # one masked position: nothing cached
        if m.get("vocab_mask"):
            feeds["vocab_mask"] = np.ones((1, m["vocab_size"]), bool)
        empty = np.zeros((1, m["num_key_value_heads"], 1, m["head_size"]), self.kv_dtype)  # [slots, kv, capacity, d]
        feeds.update({n: empty for n in self.manifest["inputs"] if n.startswith("past_key_values.")})
        return self.session.run(["logits"], feeds)[0]


class OrtStepBackend(StepLoopBackend):
    """The step-loop backend on onnxruntime's CPU executor (a pool-layout export)."""

    name = "onnxruntime"

    @classmethod
    def load(cls, path: Path, *, slots: int = 1, source: Path | None = None,
             accuracy_level: int = DEFAULT_ACCURACY_LEVEL, capacity: int | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, providers: list[str] | None = None) -> "OrtStepBackend":
        """`providers`: onnxruntime's execution providers (default CPU). The pool lives in host memory that
        onnxruntime binds by address; with a GPU provider onnxruntime copies what each step binds (a device-resident
        pool is the TensorRT executor's, runtime/tensorrt.py)."""
        from trt_gemma.onnx.export import read_manifest
        from trt_gemma.runtime.ort_executor import OrtExecutor
        from trt_gemma.runtime.tokenizer import GemmaTokenizer

        path = Path(path)
        man = read_manifest(path)
        m = man["model"]
        act = m.get("activation_dtype", "float32")
        if act not in KV_NUMPY:
            raise InputError(f"{path} computes in {act}, which this backend cannot run",
                             fix="re-export with `trt-gemma export-onnx --activations float32` (or float16)")
        threads = _threads()
        if threads is None and int(man["external_bytes"]) < SMALL_MODEL_BYTES:
            threads = 1  # as OrtModel: a tiny GEMV split over threads costs more than it saves
        ex = OrtExecutor.open(path, session_options(accuracy_level, threads), providers)
        cap = min(m["max_seq_len"], capacity or _capacity())
        shape = PoolShape(m["num_hidden_layers"], m["num_key_value_heads"], m["head_size"],
                          np.dtype(KV_NUMPY[act]).name, cap, max(1, slots))
        shown = Path(source) if source is not None else path
        info = ModelInfo(name=shown.name, path=str(shown), context_length=cap, vocab_size=m["vocab_size"],
                         dtype=m["dtype"], quant_algo=m["quant_algo"])
        loop = StepLoop(ex, shape, m["vocab_size"], m["top_k"], m["max_seq_len"],
                        vocab_mask=bool(m.get("vocab_mask")), prefill_chunk=prefill_chunk)
        backend = cls(loop, GemmaTokenizer.from_dir(path), info, weight_bytes=int(man["external_bytes"]))
        backend.model = PoolModel(ex.session, man, KV_NUMPY[act])
        return backend


def _capacity() -> int:
    """TRT_GEMMA_KV_CAPACITY: positions per slot of the KV pool (default DEFAULT_CAPACITY, at most max_seq_len)."""
    v = os.environ.get("TRT_GEMMA_KV_CAPACITY")
    return int(v) if v and v.isdigit() and int(v) > 0 else DEFAULT_CAPACITY
