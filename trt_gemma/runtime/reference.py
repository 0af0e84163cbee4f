"""Backend over the numpy reference runtime (trt_gemma.reference): runs any TensorRT-LLM checkpoint on the CPU.

KV accounting: every generation allocates its own float32 cache, so capacity is a token budget of
`slots x context_length` (what `slots` concurrent full-length requests would hold) and use is the sum of tokens in
live caches (prompt + tokens generated so far), updated per step.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from trt_gemma.runtime.base import Backend, GenerationParams, KVUsage, MemoryFootprint, ModelInfo, Step


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, model, tokenizer, info: ModelInfo, slots: int = 1):
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.slots = max(1, slots)
        self._live: dict[int, int] = {}  # generation id -> tokens in its cache
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, *, slots: int = 1) -> "ReferenceBackend":
        from trt_gemma.reference import ReferenceModel
        from trt_gemma.runtime.tokenizer import GemmaTokenizer

        path = Path(path)
        model = ReferenceModel.load(path)
        tok = GemmaTokenizer.from_dir(path)
        c = model.config
        info = ModelInfo(name=path.name, path=str(path), context_length=c.max_position_embeddings,
                         vocab_size=c.vocab_size, dtype=c.dtype, quant_algo=c.quant_algo)
        return cls(model, tok, info, slots=slots)

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams,
               cancel: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        from trt_gemma.reference import SamplingParams, generate_stream

        stop_ids = () if params.ignore_eos else tuple(self.tokenizer.stop_token_ids)
        sp = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, seed=params.seed, stop_token_ids=stop_ids)
        decoder = self.tokenizer.incremental_decoder()
        gid = next(self._ids)
        with self._lock:
            self._live[gid] = len(prompt_ids)
        try:
            for ev in generate_stream(self.model, list(prompt_ids), sp, cancel=cancel):
                with self._lock:
                    self._live[gid] += 1
                text = "" if ev.finish_reason == "stop" else decoder.push(ev.token_id)  # a stop token is not text
                if ev.finish_reason is not None:
                    text += decoder.flush()
                yield Step(ev.token_id, text, ev.step_seconds, ev.is_prompt_step, ev.finish_reason)
        finally:
            with self._lock:
                del self._live[gid]

    def kv_usage(self) -> KVUsage:
        with self._lock:
            used = sum(self._live.values())
        return KVUsage(capacity_tokens=self.slots * self.info.context_length, used_tokens=used,
                       bytes_per_token=self.model.kv_bytes_per_token)

    def memory(self) -> MemoryFootprint:
        kv = self.kv_usage()
        return MemoryFootprint(weights_bytes=self.model.weight_bytes, kv_used_bytes=kv.used_bytes,
                               kv_capacity_bytes=kv.capacity_bytes)

    def close(self) -> None:
        self.model = None
