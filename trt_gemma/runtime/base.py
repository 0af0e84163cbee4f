"""The small interface every serving backend implements (reference numpy runtime now; TensorRT-LLM, onnxruntime later).

A backend owns a loaded model and its tokenizer. The server only ever calls what is declared here, from worker threads:
`stream()` must be safe to call from several threads at once (one generation per call) and must stop soon after
`cancel()` turns true, so a disconnected client frees its slot.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Sequence

if TYPE_CHECKING:
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    context_length: int  # prompt + generated tokens must fit (max_position_embeddings, or the engine's max_seq_len)
    vocab_size: int
    dtype: str
    quant_algo: str | None = None


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, load tests)


@dataclass(frozen=True)
class Step:
    """One generated token. `text` is the new text it completes (may be "" mid multi-byte/BPE merge); a stop token
    carries finish_reason "stop" and no text. The first step's `step_seconds` includes the prompt (time to first
    token)."""

    token_id: int
    text: str
    step_seconds: float
    is_prompt_step: bool
    finish_reason: str | None = None


@dataclass(frozen=True)
class KVUsage:
    """KV cache as a token budget: capacity across all slots, tokens held by live generations now."""

    capacity_tokens: int
    used_tokens: int
    bytes_per_token: int

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token

    @property
    def used_bytes(self) -> int:
        return self.used_tokens * self.bytes_per_token

    @property
    def usage_perc(self) -> float:
        """0..1, as vLLM's kv_cache_usage_perc ("1 means 100 percent usage")."""
        return self.used_tokens / self.capacity_tokens if self.capacity_tokens else 0.0


@dataclass(frozen=True)
class MemoryFootprint:
    weights_bytes: int
    kv_used_bytes: int
    kv_capacity_bytes: int


class Backend(ABC):
    """Every backend tokenizes with the model's own tokenizer files (trt_gemma.runtime.tokenizer.GemmaTokenizer), so the
    text side is shared here; a backend provides loading, generation and its KV/memory figures."""

    name: ClassVar[str]
    info: ModelInfo
    tokenizer: "GemmaTokenizer"
    choice: str | None = None  # why this backend was picked for a bundle (the serve log line says it)

    @classmethod
    @abstractmethod
    def load(cls, path: Path, *, slots: int = 1) -> "Backend":
        """Load the model at `path`; `slots` = concurrent generations the KV budget is sized for."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_bos=add_bos))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Render with the model's chat template (generation prompt added) and encode; InputError on bad roles."""
        return list(self.tokenizer.encode_chat(messages))

    @abstractmethod
    def stream(self, prompt_ids: Sequence[int], params: GenerationParams,
               cancel: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        """Yield one Step per generated token; the last has finish_reason set."""

    @abstractmethod
    def kv_usage(self) -> KVUsage: ...

    @abstractmethod
    def memory(self) -> MemoryFootprint: ...

    def check(self) -> None:
        """Raise if the backend can no longer generate (a one-token probe). The server calls it after an unexpected
        error to tell a bad request from a broken backend."""
        for _ in self.stream(self.encode("hi"), GenerationParams(max_tokens=1, temperature=0.0)):
            pass

    def close(self) -> None:
        """Release the model (engines free device memory here)."""
