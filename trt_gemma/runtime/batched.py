"""A serving backend over the step loop (runtime/steploop.py): `stream()` hands the request to the engine thread
and yields its tokens as they come, so every running request shares each graph execution.

The backend is the same for every executor: onnxruntime's (runtime/ort_executor.py) on a CPU host and in the tests,
a TensorRT one on a GPU. The scheduler (runtime/scheduler.py) keeps admitting, queueing, 429s and cancellation as
for any backend: each admitted request's worker thread (or, alone, its consumer's thread) just waits on its row's
queue, and its slot in the KV pool is the one the loop gives it.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from trt_gemma.errors import InputError
from trt_gemma.runtime.base import Backend, GenerationParams, KVUsage, MemoryFootprint, ModelInfo, Step
from trt_gemma.runtime.steploop import END, Row, StepLoop


class StepLoopBackend(Backend):
    name = "steploop"

    def __init__(self, loop: StepLoop, tokenizer, info: ModelInfo, *, weight_bytes: int,
                 max_prompt: int | None = None):
        """`loop`: a StepLoop over the backend's executor (closed with the backend). `max_prompt`: the most prompt
        tokens the executor can read (an engine's prefill profile; None: up to the context)."""
        self.tokenizer, self.info, self.weight_bytes = tokenizer, info, weight_bytes
        self.max_prompt = max_prompt
        self.slots = loop.pool.shape.slots
        self.loop, self.executor = loop, loop.ex
        self._thread = threading.Thread(target=self.loop.run_forever, name="trt-gemma-engine", daemon=True)
        self._thread.start()

    @property
    def context_length(self) -> int:
        return self.loop.limit

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams,
               cancel: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        ids = np.asarray([int(t) for t in prompt_ids], np.int64)
        if ids.size == 0:
            raise InputError("the prompt has no tokens", fix="pass a non-empty prompt (the tokenizer adds <bos>)")
        if ids.size >= self.loop.limit:
            raise InputError(f"the prompt has {ids.size} tokens; the model's context is {self.loop.limit}",
                             fix=f"shorten the prompt below {self.loop.limit} tokens")
        if self.max_prompt is not None and ids.size > self.max_prompt:
            raise InputError(f"the prompt has {ids.size} tokens; this engine reads at most {self.max_prompt} "
                             "(its prefill profile, the recipe's max_input_len)",
                             fix=f"shorten the prompt to {self.max_prompt} tokens, or rebuild the bundle with a larger "
                                 "--set max_input_len")
        if ids.min() < 0 or ids.max() >= self.info.vocab_size:
            raise InputError(f"token ids must be in 0..{self.info.vocab_size - 1}", fix="use the model's own tokenizer")
        items: queue.SimpleQueue = queue.SimpleQueue()
        gone = threading.Event()  # the consumer left: the loop frees the row at its next turn
        stops = frozenset(() if params.ignore_eos else self.tokenizer.stop_token_ids)
        row = Row(ids, params, stops, items.put, cancel, gone.is_set)
        self.loop.submit(row)
        decoder = self.tokenizer.incremental_decoder()
        ended = False
        try:
            while True:
                try:
                    item = items.get_nowait()
                except queue.Empty:
                    if self.loop.drive_alone(row):  # alone: this thread runs the turn
                        continue
                    item = items.get()
                if item is END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    raise item
                token, seconds, first, reason = item
                text = "" if reason == "stop" else decoder.push(token)  # a stop token is not text
                if reason is not None:
                    text += decoder.flush()
                yield Step(token, text, seconds, first, reason)
                if reason is not None:
                    return
        finally:
            gone.set()
            self.loop.wake()
            while not ended:  # the row's slot and KV are free when the consumer leaves, as with a per-request cache
                ended = items.get() is END

    def kv_usage(self) -> KVUsage:
        return KVUsage(capacity_tokens=self.slots * self.loop.limit, used_tokens=self.loop.used_tokens(),
                       bytes_per_token=self.loop.pool.shape.bytes_per_token)

    def memory(self) -> MemoryFootprint:
        kv = self.kv_usage()
        return MemoryFootprint(weights_bytes=self.weight_bytes, kv_used_bytes=kv.used_bytes,
                               kv_capacity_bytes=kv.capacity_bytes)

    def close(self) -> None:
        self.loop.close()
        self._thread.join()
        self.executor.close()
