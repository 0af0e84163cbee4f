"""The TensorRT backend: the step loop (runtime/batched.py) over a built engine, and the step model `trt-gemma check`
runs, both built by one function from any `Executor` and the engine's build record.

What the record fixes (BUNDLE/tensorrt/manifest.json "io", as the builder saw it; engine/profiles.py made it):
- the KV pool: every profile binds `past_key_values.*` as [slots, kv_heads, capacity, head_dim] with slots up to the
  recipe's max_batch_size and capacity up to its max_seq_len, so the pool is the largest shape all profiles take;
- the profiles, in the engine's order (prefill, then decode): each step runs under the one `select_profile` picks
  for its shapes (runtime/steploop.py), and a prompt is prefilled in chunks of the prefill profile's largest
  `input_ids` width (max_input_len), so a prompt the recipe admits is one step at past 0, the shape that profile is
  built around; a longer prompt is refused before any step (a later chunk would need a past beyond its range).

On a CPU host the same function takes an `OrtExecutor` over the bundle's own pool graph (BUNDLE/onnx/) holding the
record's profiles, which refuses a step outside the profile it names as TensorRT would: the tests run the backend a
GPU runs, with onnxruntime doing the arithmetic.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from trt_gemma.errors import InputError
from trt_gemma.runtime.base import GenerationParams, ModelInfo
from trt_gemma.runtime.batched import StepLoopBackend
from trt_gemma.runtime.executor import Executor
from trt_gemma.runtime.pool import PoolShape
from trt_gemma.runtime.steploop import DEFAULT_PREFILL_CHUNK, Row, StepLoop

POOL_INPUT = "past_key_values.0.key"


@dataclass(frozen=True)
class PoolPlan:
    """What a step loop over a pool graph is sized by: the largest pool (slots x capacity of `dtype`), the most
    prompt tokens one step takes, and the optimization profiles in the engine's order (none: onnxruntime's one)."""

    slots: int
    capacity: int
    dtype: str
    max_new: int
    profiles: tuple = ()

    @classmethod
    def of_engine(cls, record: Mapping, bundle) -> "PoolPlan":
        """From the engine's build record: the pool every profile takes, the widest `input_ids`."""
        profiles = tuple(dict(p) for p in (record.get("io") or {}).get("profiles", {}).values())
        his = [p[POOL_INPUT][2] for p in profiles if POOL_INPUT in p]
        spec = next((t for t in (record.get("io") or {}).get("tensors", []) if t["name"] == POOL_INPUT), None)
        if not his or spec is None:
            from trt_gemma.runtime.engine_plan import rebuild_command

            raise InputError(f"the engine of {bundle} has no KV-pool input ({POOL_INPUT} with profile ranges): it "
                             "was built from a graph without the pool layout", fix=rebuild_command(bundle))
        new = max(p["input_ids"][2][1] for p in profiles if "input_ids" in p)
        return cls(min(h[0] for h in his), min(h[2] for h in his), spec["dtype"], new, profiles)

    @classmethod
    def of_graph(cls, man: Mapping, slots: int = 1) -> "PoolPlan":
        """From a pool export's manifest alone (onnxruntime takes any shape): `slots` x max_seq_len."""
        spec = next(t for t in man["io"] if t["name"] == POOL_INPUT)
        return cls(slots, man["model"]["max_seq_len"], spec["dtype"], DEFAULT_PREFILL_CHUNK)


def open_loop(ex: Executor, man: Mapping, plan: PoolPlan, *, slots: int | None = None,
              prefill_chunk: int | None = None, consumer_turns: bool = True) -> StepLoop:
    """The step loop over `ex` for the pool graph of `man` (its export manifest), sized and profiled by `plan`."""
    m = man["model"]
    shape = PoolShape(m["num_hidden_layers"], m["num_key_value_heads"], m["head_size"], plan.dtype, plan.capacity,
                      min(slots or plan.slots, plan.slots))
    return StepLoop(ex, shape, m["vocab_size"], m["top_k"], m["max_seq_len"], vocab_mask=bool(m.get("vocab_mask")),
                    prefill_chunk=min(prefill_chunk or plan.max_new, plan.max_new), consumer_turns=consumer_turns,
                    profiles=plan.profiles)


class TensorRTBackend(StepLoopBackend):
    """The step-loop backend whose executor runs the bundle's engine (or, in the tests, onnxruntime on its graph)."""

    name = "tensorrt"

    @classmethod
    def over(cls, ex: Executor, record: Mapping, bundle: Path, *, slots: int | None = None,
             prefill_chunk: int | None = None, consumer_turns: bool = True) -> "TensorRTBackend":
        """The backend over `ex` with the pool and profiles of `record`; the model, tokenizer and weight bytes come
        from BUNDLE/onnx, the graph the engine was built from."""
        from trt_gemma.onnx.export import read_manifest
        from trt_gemma.runtime.tokenizer import GemmaTokenizer

        bundle = Path(bundle)
        man = read_manifest(bundle / "onnx")
        m = man["model"]
        plan = PoolPlan.of_engine(record, bundle)
        loop = open_loop(ex, man, plan, slots=slots, prefill_chunk=prefill_chunk, consumer_turns=consumer_turns)
        info = ModelInfo(name=bundle.name, path=str(bundle), context_length=loop.limit, vocab_size=m["vocab_size"],
                         dtype=m["dtype"], quant_algo=m["quant_algo"])
        # a longer prompt's second chunk would need a past beyond the prefill profile: refused before any step
        return cls(loop, GemmaTokenizer.from_dir(bundle / "onnx"), info, weight_bytes=int(man["external_bytes"]),
                   max_prompt=plan.max_new)

    @classmethod
    def load(cls, bundle: Path, *, slots: int = 1, prefill_chunk: int | None = None) -> "TensorRTBackend":
        """BUNDLE/tensorrt/model.engine on this GPU (TensorRTExecutor checks builder, version, SM and I/O)."""
        from trt_gemma.runtime.tensorrt import TensorRTExecutor

        ex = TensorRTExecutor(bundle)
        record = ex.record
        try:
            # consumer_turns=False: the executor's CUDA stream and TensorRT context are used from the engine thread
            # only, so no consumer thread has to make the device's context current (cuda-python binds the primary
            # context per thread) and the CUDA-graph capture never sees two threads issuing on one stream
            backend = cls.over(ex, record, bundle, slots=slots, prefill_chunk=prefill_chunk, consumer_turns=False)
        except BaseException:
            ex.close()
            raise
        backend.choice = f"its engine on this GPU ({record.get('builder')} {record.get('builder_version')})"
        return backend

    def device_memory(self) -> dict[str, int]:
        """memory_bytes{kind} of the real allocations: the engine, its activations and step buffers, the KV pool."""
        return self.executor.memory_bytes()


class PoolStepModel:
    """A step loop as check's step model (`new_cache`, `forward(ids, cache, last_only=True)`): each cache is a row
    holding a slot of the pool, `forward` runs its tokens through the loop's own steps (prefill chunks under the
    prefill profile, single tokens under decode) and returns the last position's logits [1, vocab], the row the
    loop samples from. Single-threaded: the caller is the only driver of the loop."""

    def __init__(self, loop: StepLoop, executor: Executor):
        self.loop, self.executor = loop, executor

    def new_cache(self, capacity: int = 512) -> "PoolCache":
        if not 1 <= capacity <= self.loop.limit:
            raise InputError(f"KV capacity {capacity} is outside 1..{self.loop.limit} (the engine's pool)",
                             fix="ask for fewer prompt + generated tokens")
        if not self.loop.pool.free:
            raise InputError(f"all {self.loop.pool.shape.slots} slots of the pool hold live caches",
                             fix="drop a cache before making another")
        return PoolCache(self.loop, self._sink)

    def _sink(self, item) -> None:
        if isinstance(item, BaseException):
            self._error = item

    def forward(self, ids, cache: "PoolCache | None" = None, last_only: bool = True) -> np.ndarray:
        if not last_only:
            raise InputError("the engine returns the last position's logits only", fix="call with last_only=True")
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        if not ids:
            raise InputError("no token ids to run", fix="pass at least one token")
        cache = cache if cache is not None else self.new_cache(len(ids))
        row = cache.row
        if row.length + len(ids) > self.loop.limit:
            raise InputError(f"the cache holds {row.length} tokens and cannot take {len(ids)} more",
                             fix="make a cache with room for the prompt and the generated tokens")
        self._error, views = None, None
        for at in range(0, len(ids), self.loop.prefill_chunk):  # the loop's own chunks, under the prefill profile
            part = ids[at:at + self.loop.prefill_chunk]
            views = self.loop.run_step([row], part, len(part), final=False)
            if views is None:
                raise self._error
        return self.executor.download(views.logits)[:1].astype(np.float32)

    def batch_tok_s(self, prompts: list[list[int]], max_tokens: int) -> float:
        """Aggregate greedy decode tok/s with every prompt in the loop at once (one step advances them all): the
        tokens after each row's first, over the time from the last first token to the end."""
        count = {"first": 0, "later": 0}

        def sink(item):
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, tuple):  # (token, seconds, is_first, finish_reason)
                count["first" if item[2] else "later"] += 1

        params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        rows = [Row(np.asarray(p, np.int64), params, frozenset(), sink, lambda: False) for p in prompts]
        for row in rows:
            self.loop.submit(row)
        while count["first"] < len(rows):
            self.loop.turn()
        t0, before = time.perf_counter(), count["later"]
        while self.loop.rows or self.loop.waiting:
            self.loop.turn()
        seconds = time.perf_counter() - t0
        return round((count["later"] - before) / seconds, 2) if seconds > 0 else float("inf")

    def close(self) -> None:
        self.executor.close()


class PoolCache:
    """One sequence of a PoolStepModel: a row holding a slot of the pool (given back when the cache is dropped).
    The row stays out of the loop's running rows: only `forward` runs it."""

    def __init__(self, loop: StepLoop, sink):
        self.row = Row(np.zeros(0, np.int64), GenerationParams(max_tokens=1), frozenset(), sink, lambda: False)
        self.row.slot = loop.pool.take()
        weakref.finalize(self, loop.pool.give_back, self.row.slot)


def step_model(ex: Executor, onnx_dir: Path, plan: PoolPlan | None = None) -> PoolStepModel:
    """The step model over `ex` running the pool graph of ONNX_DIR, sized by `plan` (default: the graph's own,
    one slot)."""
    from trt_gemma.onnx.export import read_manifest

    man = read_manifest(Path(onnx_dir))
    return PoolStepModel(open_loop(ex, man, plan or PoolPlan.of_graph(man)), ex)


def load_step_model(bundle: Path) -> PoolStepModel:
    """BUNDLE's engine as check's step model: the TensorRT backend's loop over a `TensorRTExecutor`."""
    from trt_gemma.runtime.tensorrt import TensorRTExecutor

    ex = TensorRTExecutor(bundle)
    try:
        return step_model(ex, Path(bundle) / "onnx", PoolPlan.of_engine(ex.record, bundle))
    except BaseException:  # a refused plan leaves no device memory behind
        ex.close()
        raise
