"""Token generation on the reference model: a streaming generator of StepEvents, and `generate` returning a record
with the telemetry every generation reports (TTFT, decode tokens/s, peak RSS, effective bandwidth)."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from trt_gemma.errors import InputError
from trt_gemma.reference.model import ReferenceModel
from trt_gemma.reference.sampling import Sampler, SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class StepEvent:
    """One generated token. The last event of a stream has `finish_reason` set:
    "stop": token_id is the stop token and is NOT text; "length" (max_tokens or the context is full) and
    "cancelled": token_id is a real generated token (emit it), and nothing follows.
    `step_seconds` is the wall time to produce this token (for the first, prefill included: TTFT)."""

    token_id: int
    step_seconds: float
    is_prompt_step: bool
    finish_reason: str | None = None


def generate_stream(model: ReferenceModel, prompt_ids: Sequence[int], params: SamplingParams,
                    cancel: Callable[[], bool] | None = None) -> Iterator[StepEvent]:
    """Yield one StepEvent per generated token. Each call owns its KVCache, so threads can share `model`.
    `cancel()` is polled after every token; when it returns True that token's event ends the stream."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise InputError("the prompt has no tokens", fix="pass a non-empty prompt (the tokenizer adds <bos>)")
    limit = model.config.max_position_embeddings
    if len(ids) >= limit:
        raise InputError(f"the prompt has {len(ids)} tokens; the model's context is {limit}",
                         fix=f"shorten the prompt below {limit} tokens")
    capacity = min(limit, len(ids) + params.max_tokens)
    cache = model.new_cache(capacity)
    sample = Sampler(params)
    stops = set(params.stop_token_ids)
    feed = np.asarray(ids)
    for step in range(params.max_tokens):
        t0 = time.perf_counter()
        token = sample(model.forward(feed, cache, last_only=True)[-1])
        dt = time.perf_counter() - t0
        reason = None
        if token in stops:
            reason = "stop"
        elif step + 1 == params.max_tokens or cache.length >= cache.capacity:
            reason = "length"
        elif cancel is not None and cancel():
            reason = "cancelled"
        yield StepEvent(token, dt, step == 0, reason)
        if reason is not None:
            return
        feed = np.asarray([token])


@dataclass(frozen=True)
class GenerationResult:
    """Everything one generation did. Times in seconds, sizes in bytes.
    `generated_tokens` counts text tokens (a final stop token excluded); `decode_tokens_per_s` covers the tokens
    after the first (the first one's time is TTFT, prefill included); effective bandwidth = weight bytes x decode
    tokens/s (every decode step reads every weight once, gpt-fast's "bandwidth achieved")."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    peak_rss_bytes: int
    weight_bytes: int
    effective_bandwidth_bytes_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_bytes() -> int:
    """Peak resident set of this process (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def generate(model: ReferenceModel, prompt_ids: Sequence[int], params: SamplingParams, tokenizer=None,
             on_text: Callable[[str], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> GenerationResult:
    """Run generate_stream to the end. With a tokenizer, text is decoded incrementally and passed to `on_text`
    as it comes (stop tokens and special tokens are not text)."""
    decoder = tokenizer.incremental_decoder() if tokenizer is not None else None
    pieces: list[str] = []
    tokens: list[int] = []
    events: list[StepEvent] = []
    start = time.perf_counter()
    for ev in generate_stream(model, prompt_ids, params, cancel=cancel):
        events.append(ev)
        if ev.finish_reason == "stop":
            break
        tokens.append(ev.token_id)
        if decoder is not None:
            _emit(decoder.push(ev.token_id), pieces, on_text)
    if decoder is not None:
        _emit(decoder.flush(), pieces, on_text)
    total = time.perf_counter() - start
    ttft = events[0].step_seconds
    decode_time = sum(ev.step_seconds for ev in events[1:])
    decode_tps = (len(events) - 1) / decode_time if decode_time > 0 else 0.0
    return GenerationResult(
        text="".join(pieces), token_ids=tokens, finish_reason=events[-1].finish_reason or "length",
        prompt_tokens=len(prompt_ids), generated_tokens=len(tokens), ttft_s=ttft, decode_tokens_per_s=decode_tps,
        total_s=total, peak_rss_bytes=peak_rss_bytes(), weight_bytes=model.weight_bytes,
        effective_bandwidth_bytes_per_s=model.weight_bytes * decode_tps)


def _emit(text: str, pieces: list[str], on_text) -> None:
    if text:
        pieces.append(text)
        if on_text is not None:
            on_text(text)
