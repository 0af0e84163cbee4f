"""The Python API for apps that embed the model: `load()` a model, then `generate` / `stream` / `chat` through the
same bounded scheduler the HTTP server uses (trt_gemma.runtime.scheduler), with the same telemetry snapshot.

Threads and asyncio: one `Model` may be used from any number of threads and event loops at once. At most
`max_concurrency` generations run (which also sizes the KV budget); the others wait, in arrival order, for a slot
(`max_queue` bounds how many may wait; None = no bound). A `Stream` is one generation: iterate it for `Piece`s,
`cancel()` it from any thread, or leave its `for` loop (or `with` block) early: generation stops after the token
being computed and the slot is given back. A `Stream` that is the only generation runs on the thread iterating it
(no per-token hand-over); once another one runs or waits, every generation runs on a worker thread, so a stream
whose caller stops iterating still finishes and frees its slot (trt_gemma.runtime.scheduler).

Defaults are `trt-gemma generate`'s (greedy, 64 tokens: reference.sampling.SamplingParams); the server's are
OpenAI's. docs/api.md maps every field onto the server's JSON and metrics.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from trt_gemma.runtime.base import Backend, GenerationParams, MemoryFootprint, Step
from trt_gemma.errors import ConfigError, InputError, ResourceError
from trt_gemma.reference.sampling import SamplingParams
from trt_gemma.runtime.scheduler import Generation, Scheduler, TextPieces
from trt_gemma.runtime.stops import stop_list

if TYPE_CHECKING:
    from types import TracebackType

    from trt_gemma.runtime.tokenizer import GemmaTokenizer

Message = Mapping[str, str]
Prompt = Union[str, Sequence[int], Sequence[Message]]
DEFAULT_MAX_TOKENS = SamplingParams.max_tokens  # `trt-gemma generate`'s default, one source of truth


@dataclass(frozen=True)
class Usage:
    """Token counts as the server's `usage` object: completion tokens include a final stop token."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds seen by the caller. `ttft_s` counts from the call (queueing and prefill included);
    `decode_tokens_per_s` covers the tokens after the first."""

    queue_s: float
    ttft_s: float
    total_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Piece:
    """What one step of a stream adds: the text delta (may be "" while a stop string or a multi-byte character is
    pending), the ids of the text tokens behind it, and the finish reason on the last piece."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    steps: tuple[Step, ...] = field(default=(), repr=False)
    """The backend's steps behind this piece, a final stop token included: per-token `step_seconds` (the first one's
    includes the prompt), what the server's time_per_output_token histogram observes."""


@dataclass(frozen=True)
class Completion:
    """A finished generation. `token_ids` are the text tokens (a stop token is not text, as in `trt-gemma
    generate`); `finish_reason` is "stop" (stop token or stop string), "length" or "cancelled".
    `peak_rss_bytes`: the process's peak resident set when it ended (getrusage; CPU backends hold weights and KV
    there); `weights_bytes`: the weight bytes every decode step reads."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    timings: Timings
    peak_rss_bytes: int
    weights_bytes: int

    @property
    def effective_bandwidth_bytes_per_s(self) -> float:
        """Weight bytes x decode tokens/s: each decode step reads every weight once (gpt-fast's "bandwidth
        achieved"); compare it with the device's memory bandwidth."""
        return self.weights_bytes * self.timings.decode_tokens_per_s


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded and where: `target` is the bundle's build target (None for other inputs); `precision` is
    the weight quantization when there is one, else the dtype; `memory` is the footprint now."""

    name: str
    path: str
    backend: str
    target: str | None
    dtype: str
    quant_algo: str | None
    context_length: int
    vocab_size: int
    max_concurrency: int
    memory: MemoryFootprint

    @property
    def precision(self) -> str:
        return self.quant_algo or self.dtype


class Run:
    """The bookkeeping of one generation behind Stream and AsyncStream (the API's and the server's): pieces with
    stop strings cut, timings, the Completion."""

    def __init__(self, gen: Generation, stops: list[str]):
        self.gen, self.pieces = gen, TextPieces(stops)
        self.weights_bytes = gen.server.weights_bytes()  # now: a closed backend no longer answers
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last = self.t0
        self.done: Completion | None = None
        self.text: list[str] = []

    def piece(self, steps: list[Step]) -> Piece:
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.last = now
        before = len(self.pieces.token_ids)
        text, used = self.pieces.feed(steps)
        self.text.append(text)
        return Piece(text, tuple(self.pieces.token_ids[before:]), self.pieces.finish, tuple(used))

    def finish(self) -> Completion:
        """The Completion (once the steps have ended); a generation failure is raised here."""
        if self.done is None:
            from trt_gemma.reference.generate import peak_rss_bytes

            if self.gen.failure is not None:
                raise self.gen.failure
            p, first = self.pieces, self.first if self.first is not None else self.last
            decode = (p.completion_tokens - 1) / (self.last - first) if self.last > first else 0.0
            started = self.gen.slot_at if self.gen.slot_at is not None else self.last
            self.done = Completion("".join(self.text), tuple(p.token_ids), p.finish or "cancelled",
                                   Usage(len(self.gen.prompt_ids), p.completion_tokens),
                                   Timings(queue_s=started - self.t0, ttft_s=first - self.t0,
                                           total_s=self.last - self.t0, decode_tokens_per_s=decode),
                                   peak_rss_bytes=peak_rss_bytes(), weights_bytes=self.weights_bytes)
        return self.done


class Stream:
    """One generation, as an iterator of `Piece`s and the handle to stop it. Use it in a `for` loop or a `with`
    block; `cancel()` may be called from any thread. After the last piece, `completion()` has the whole result."""

    def __init__(self, run: Run):
        self._run = run
        self._steps = run.gen.steps()
        self._over = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Piece:
        if self._over:
            raise StopIteration
        try:
            steps = next(self._steps)
        except StopIteration:
            self._over = True
            self._run.finish()  # raises a generation failure
            raise
        piece = self._run.piece(steps)
        if piece.finish_reason is not None:
            self.close()
        return piece

    def cancel(self) -> None:
        """Stop generating (thread-safe): the slot is free again after the token being computed."""
        self._run.gen.cancelled.set()

    def close(self) -> None:
        """Cancel and end the iteration (call from the iterating thread; `cancel()` from others)."""
        self._over = True
        self._run.gen.abandon()
        self._steps.close()

    def completion(self) -> Completion:
        """Iterate to the end (if not done yet) and return the Completion."""
        for _ in self:
            pass
        return self._run.finish()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a `for` loop left with break drops the last reference here
        try:
            self.close()
        except Exception:
            pass


class AsyncStream:
    """`Stream` for asyncio: `async for piece in model.astream(...)`, `async with`, `await completion()`."""

    def __init__(self, run: Run):
        self._run = run
        self._batches = run.gen.batches()
        self._over = False

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Piece:
        if self._over:
            raise StopAsyncIteration
        try:
            steps = await self._batches.__anext__()
        except StopAsyncIteration:
            self._over = True
            self._run.finish()
            raise
        piece = self._run.piece(steps)
        if piece.finish_reason is not None:
            await self.aclose()
        return piece

    def cancel(self) -> None:
        """Stop generating (thread-safe)."""
        self._run.gen.cancelled.set()

    async def aclose(self) -> None:
        self._over = True
        self._run.gen.abandon()
        await self._batches.aclose()

    async def completion(self) -> Completion:
        async for _ in self:
            pass
        return self._run.finish()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self._run.gen.abandon()


class Model:
    """A loaded model behind the bounded scheduler. Made by `trt_gemma.load()`; thread-safe; close it (or use
    `with`) to release the model and its worker threads."""

    def __init__(self, backend: Backend, *, max_concurrency: int = 1, max_queue: int | None = None,
                 target: str | None = None):
        if max_concurrency < 1 or (max_queue is not None and max_queue < 0):
            raise InputError(f"max_concurrency must be >= 1 and max_queue >= 0 or None (got {max_concurrency}, "
                             f"{max_queue})", fix="e.g. load(..., max_concurrency=2)")
        self._backend = backend
        self._scheduler = Scheduler.create(backend, max_concurrency, max_queue)
        self._target = target
        self._closed = False

    # ---- what is loaded --------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> "GemmaTokenizer":
        """The model's own tokenizer (encode, decode, encode_chat, stop_token_ids)."""
        return self._backend.tokenizer

    @property
    def info(self) -> ModelInfo:
        b = self._backend
        i = b.info
        return ModelInfo(name=i.name, path=i.path, backend=b.name, target=self._target, dtype=i.dtype,
                         quant_algo=i.quant_algo, context_length=i.context_length, vocab_size=i.vocab_size,
                         max_concurrency=self._scheduler.admission.max_concurrency,  # type: ignore[union-attr]
                         memory=b.memory())

    def telemetry(self) -> dict[str, Any]:
        """The snapshot the server's /v1/telemetry serves: memory by kind, NVML / Jetson sources, KV use."""
        from trt_gemma.telemetry import snapshot

        return snapshot(self._backend)

    # ---- generation ------------------------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, *, max_tokens: int | None = None,
               temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
               top_k: int = SamplingParams.top_k, seed: int | None = None, stop: str | Sequence[str] | None = None,
               ignore_eos: bool = False) -> Stream:
        """Start one generation and return its `Stream` of pieces.

        `prompt`: text (a <bos> is added), token ids, or chat messages ([{"role": "user", "content": ...}]: the
        model's chat template). `max_tokens`: None = 64, or what is left of the context if less. `temperature` 0
        is greedy; `top_k` 0 and `top_p` 1 are off; `seed` makes sampling reproducible; `stop`: strings that end
        the text (not included); `ignore_eos`: generate exactly max_tokens. InputError on a bad prompt or value,
        ResourceError when max_queue generations already wait or the model is closed."""
        return Stream(self._submit(prompt, max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos))

    def generate(self, prompt: Prompt, *, max_tokens: int | None = None,
                 temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
                 top_k: int = SamplingParams.top_k, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False) -> Completion:
        """Generate to the end and return the `Completion` (arguments as `stream`)."""
        with self.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         seed=seed, stop=stop, ignore_eos=ignore_eos) as s:
            return s.completion()

    def chat(self, messages: Sequence[Message], *, max_tokens: int | None = None,
             temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
             top_k: int = SamplingParams.top_k, seed: int | None = None, stop: str | Sequence[str] | None = None,
             ignore_eos: bool = False) -> Completion:
        """`generate` for a conversation: roles system / user / assistant through the model's chat template."""
        if isinstance(messages, str) or not all(isinstance(m, Mapping) for m in messages):
            raise InputError("chat() takes a list of messages ({'role': ..., 'content': ...})",
                             fix="use generate() for plain text")
        return self.generate(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=seed, stop=stop, ignore_eos=ignore_eos)

    def astream(self, prompt: Prompt, *, max_tokens: int | None = None,
                temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
                top_k: int = SamplingParams.top_k, seed: int | None = None, stop: str | Sequence[str] | None = None,
                ignore_eos: bool = False) -> AsyncStream:
        """`stream` for asyncio: `async for piece in model.astream(...)` (the loop is never blocked)."""
        return AsyncStream(self._submit(prompt, max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos))

    async def agenerate(self, prompt: Prompt, *, max_tokens: int | None = None,
                        temperature: float = SamplingParams.temperature, top_p: float = SamplingParams.top_p,
                        top_k: int = SamplingParams.top_k, seed: int | None = None,
                        stop: str | Sequence[str] | None = None, ignore_eos: bool = False) -> Completion:
        """`generate` for asyncio."""
        async with self.astream(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stop, ignore_eos=ignore_eos) as s:
            return await s.completion()

    def _submit(self, prompt: Prompt, max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                seed: int | None, stop: str | Sequence[str] | None, ignore_eos: bool) -> Run:
        if self._closed:
            raise ResourceError("this Model is closed", fix="trt_gemma.load() it again")
        check_arguments(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        seed=seed, stop=stop, ignore_eos=ignore_eos)
        ids = self._encode(prompt)
        params = self._params(len(ids), max_tokens, temperature, top_p, top_k, seed, ignore_eos)
        return Run(self._scheduler.submit(ids, params), stop_list(stop))  # QueueFull (a ResourceError) when full

    def _encode(self, prompt: Prompt) -> list[int]:
        b = self._backend
        if isinstance(prompt, str):
            return b.encode(prompt)
        items: list[object] = list(prompt) if isinstance(prompt, Sequence) else []
        messages = [dict(m) for m in items if isinstance(m, Mapping)]
        if items and len(messages) == len(items):
            return b.encode_chat(messages)
        ids = [t for t in items if isinstance(t, int) and not isinstance(t, bool)]
        if items and len(ids) == len(items):
            if not all(0 <= t < b.info.vocab_size for t in ids):
                raise InputError(f"prompt token ids must be in [0, {b.info.vocab_size})",
                                 fix="encode text with model.tokenizer.encode()")
            return ids
        raise InputError("prompt must be text, a non-empty list of token ids, or a non-empty list of chat messages",
                         fix="e.g. model.generate('Hello') or model.chat([{'role': 'user', 'content': 'Hello'}])")

    def _params(self, n_prompt: int, max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                seed: int | None, ignore_eos: bool) -> GenerationParams:
        ctx = self._backend.info.context_length
        room = ctx - n_prompt
        if room <= 0:
            raise InputError(f"the prompt has {n_prompt} tokens; the model's context is {ctx}",
                             fix=f"shorten the prompt below {ctx} tokens")
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
        elif isinstance(max_tokens, int) and max_tokens > room:
            raise InputError(f"max_tokens {max_tokens} does not fit: the prompt has {n_prompt} tokens and the "
                             f"context is {ctx}", fix=f"ask for at most {room} tokens")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
            raise InputError(f"seed must be an integer in [0, 2^64) (got {seed!r})", fix="e.g. seed=0")
        sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return GenerationParams(max_tokens=sp.max_tokens, temperature=float(sp.temperature), top_p=float(sp.top_p),
                                top_k=sp.top_k, seed=sp.seed, ignore_eos=bool(ignore_eos))

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking work, cancel what is running or waiting (their streams end "cancelled"), wait for the worker
        threads, release the model (engines free device memory)."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.close(wait=True)
        self._backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: "TracebackType | None") -> None:
        self.close()

    def __repr__(self) -> str:
        i = self._backend.info
        return f"<trt_gemma.Model {i.name} on {self._backend.name}, context {i.context_length}>"


# The generation arguments' accepted types, checked before anything else: (types, how the message names them).
# bool is an int to Python, never to us.
_ARGUMENT_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "max_tokens": ((int, type(None)), "an int or None"),
    "temperature": ((int, float), "an int or a float"),
    "top_p": ((int, float), "an int or a float"),
    "top_k": ((int,), "an int"),
    "seed": ((int, type(None)), "an int or None"),
    "ignore_eos": ((bool,), "a bool"),
}


def check_arguments(*, prompt: object, stop: object, **args: object) -> None:
    """InputError naming the argument and what it accepts, for a value of the wrong type (or a non-finite float,
    an empty prompt, bytes given as a prompt) before the value is used anywhere."""
    for name, value in args.items():
        types, what = _ARGUMENT_TYPES[name]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types) or (isinstance(value, float) and not math.isfinite(value)):
            raise InputError(f"{name} must be {what}{', finite' if isinstance(value, float) else ''} "
                             f"(got {type(value).__name__} {value!r:.80})", fix=f"pass {name} as {what}")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stops, (list, tuple)) and all(isinstance(x, str) for x in stops)):
        raise InputError(f"stop must be a str, a list of str or None (got {type(stop).__name__} {stop!r:.80})",
                         fix="e.g. stop=['\\n\\n']")
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InputError(f"prompt is {type(prompt).__name__}, not text or token ids",
                         fix="decode it first: prompt.decode('utf-8')")
    if isinstance(prompt, str) and not prompt:
        raise InputError("prompt is an empty string", fix="pass some text, token ids, or chat messages")


def load(model: str | os.PathLike[str] | None = None, *, backend: str = "auto", max_concurrency: int = 1,
         max_queue: int | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Model:
    """Load `model` and return a `Model` ready to generate.

    `model`: a `trt-gemma build` bundle, a TensorRT-LLM engine dir or checkpoint, a Hugging Face Gemma 2 dir or hub
    id (converted once into the cache), or None for the embedded model. `backend`: "auto" picks by what the
    directory holds (a bundle's engine on a GPU host with TensorRT-LLM, else its checkpoint on onnxruntime where
    installed, else on the numpy reference runtime); "reference", "onnxruntime" and "trtllm" force one.
    `max_concurrency`: generations at once (sizes the KV budget); `max_queue`: how many more may wait (None: no bound). Raises InputError (bad path or
    model), ConfigError (unknown backend), DependencyError (trtllm without a GPU / tensorrt_llm)."""
    from trt_gemma.runtime.backends import BACKENDS, load_backend
    from trt_gemma.checkpoint.hf import resolve_model

    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}", fix="use backend='auto'")
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise InputError(f"max_concurrency must be an integer >= 1 (got {max_concurrency!r})",
                         fix="e.g. max_concurrency=2")
    path = resolve_model(None if model is None else os.fspath(model))
    cache = None if cache_dir is None else Path(cache_dir)
    loaded = load_backend(path, slots=max_concurrency, cache_dir=cache, backend=backend)
    return Model(loaded, max_concurrency=max_concurrency, max_queue=max_queue, target=_target_of(path))


def _target_of(path: Path) -> str | None:
    """The build target named by a bundle's (or its engine's) manifest.json; None for other inputs."""
    from trt_gemma.manifest import read_manifest

    for d in (path, path.parent) if path.name in ("engine", "checkpoint") else (path,):
        if (d / "manifest.json").is_file():
            try:
                name = read_manifest(d).get("target", {}).get("name")
            except InputError:
                return None
            return name if isinstance(name, str) else None
    return None

