"""The batched step loop: every running request advances in one graph execution (issue: batched decoding).

`StepLoop` owns the KV pool of a pool-layout graph (onnx/pool.py) through an `Executor` and runs on one engine
thread. Each turn it admits waiting requests into free slots, spends up to `prefill_chunk` prompt tokens on the
requests still reading their prompts (oldest first, one chunk each, so a long prompt holds running streams up for at
most one chunk), then runs one decode step over every request that has a token to feed. Rows finish (stop token,
max_tokens, a full context) or are cancelled independently; a finished row's slot is free for the next turn.
Turns never overlap (`turning`); while one request is alone its own consumer runs them (`drive_alone`), so a lone
stream pays no hand-over between threads per token, and the engine thread takes over the moment another arrives.

Per step the plain Python here decides the bucket (the longest past length among the step's rows, rounded up to
`kv_bucket`: the graph gathers only those positions of the rows' slots), writes ids / past lengths / slots into the staging
buffer in one upload, runs, lands the new K/V rows in the pool (runtime/pool.py) and downloads what sampling needs:
the greedy ids, the TopK candidates for a request whose top_k fits in them, the full logits row only for a request
that samples from the whole vocabulary. Sampling is the reference sampler's (reference/sampling.py) with each
request's own seeded generator; candidates are ordered by token id first, so a draw picks the token the full-row
sampler would (the same cumulative sums, without the zeros).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from trt_gemma.errors import InputError
from trt_gemma.reference.sampling import Sampler, SamplingParams
from trt_gemma.runtime.base import GenerationParams
from trt_gemma.runtime.engine_plan import select_profile
from trt_gemma.runtime.executor import Executor
from trt_gemma.runtime.pool import KVPool, PoolShape, Staging

KV_BUCKET = 64  # positions: past lengths are bound rounded up to this
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per engine turn
END = object()  # the last item a row's sink receives


@dataclass(eq=False)
class Row:
    """One request in the loop. `sink` receives (token, seconds, is_first, finish_reason) tuples, an exception, or
    END. `cancel` (the request's) is polled after each token, whose finish_reason is then "cancelled", as the
    reference's generation does; `gone` (its consumer left: nobody reads the tokens) frees the row at the next turn."""

    prompt: np.ndarray
    params: GenerationParams
    stops: frozenset
    sink: Callable[[object], None]
    cancel: Callable[[], bool]
    gone: Callable[[], bool] = lambda: False
    sampler: Sampler = field(init=False)
    slot: int = -1
    length: int = 0  # tokens in the pool
    pending: int | None = None  # the token the next decode step feeds
    generated: int = 0
    last_t: float = field(default_factory=time.perf_counter)
    need: str = "greedy"  # what sampling reads: "greedy" (next_token), "topk" (the candidates) or "full" (logits)

    def __post_init__(self):
        p = self.params
        self.sampler = Sampler(SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                                              top_p=p.top_p, seed=p.seed))


class StepLoop:
    """The engine: call `submit` from any thread; `run_forever` on the engine thread (or `turn` from a test)."""

    def __init__(self, ex: Executor, shape: PoolShape, vocab: int, top_k: int, limit: int, *,
                 vocab_mask: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_bucket: int = KV_BUCKET,
                 consumer_turns: bool = True, profiles: Sequence[Mapping] = ()):
        """`consumer_turns`: a lone request's consumer may run the turns (`drive_alone`); an executor that must be
        called from one thread only (a thread-bound device context) turns it off. `profiles`: the engine's
        optimization profiles in its order ({input: [min, opt, max]} each); each step runs under the one
        `select_profile` picks for its shapes (none: the executor's one implicit profile, 0)."""
        self.ex, self.vocab, self.top_k = ex, vocab, top_k
        self.limit = min(limit, shape.capacity)  # positions a row may hold (prompt + generated)
        self.prefill_chunk, self.kv_bucket = max(1, prefill_chunk), max(1, kv_bucket)
        self.pool = KVPool(ex, shape)
        self.staging = Staging(ex, self.pool, vocab, top_k, max(shape.slots, self.prefill_chunk), vocab_mask)
        self.waiting: collections.deque[Row] = collections.deque()
        self.rows: list[Row] = []  # holding a slot, in admission order
        self.cv = threading.Condition()
        self.turning = threading.Lock()  # held for each turn: turns never overlap, whichever thread runs them
        self.solo: Row | None = None  # a lone row whose consumer runs the turns itself (`drive_alone`)
        self.consumer_turns = consumer_turns
        self.profiles = list(profiles)
        self._step_profile: dict[tuple[int, int, int], int] = {}  # (bucket, batch, new) -> profile index
        self.closed = False
        self.steps = 0  # graph executions (benchmarks: KV bytes read per step)
        self.kv_rows_read = 0  # sum over steps of bucket x batch: pool rows (one position of one slot) bound
        self.kv_rows_needed = 0  # sum over steps of the rows' past lengths: what an exact-length read would take

    # ---- any thread ----
    def submit(self, row: Row) -> None:
        greedy = row.sampler.params.is_greedy
        row.need = "greedy" if greedy else "topk" if 0 < row.params.top_k <= self.top_k else "full"
        with self.cv:
            if self.closed:
                raise RuntimeError("the step loop is closed")
            self.waiting.append(row)
            self.solo = None  # not alone any more: the engine thread turns from now on
            self.cv.notify()

    def wake(self) -> None:
        """A row's consumer left: the engine thread turns now (its slot is freed at the turn)."""
        with self.cv:
            self.solo = None
            self.cv.notify()

    def drive_alone(self, row: Row) -> bool:
        """Run one turn on the calling thread (the consumer of `row`, waiting for its next token) if `row` is the
        only request: a lone stream then decodes with no hand-over between threads, as a per-request generation
        does. False when others are there (the engine thread serves them all)."""
        if not self.consumer_turns:
            return False
        with self.cv:
            alone = not self.closed and (self.rows == [row] and not self.waiting
                                         or not self.rows and len(self.waiting) == 1 and self.waiting[0] is row)
            self.solo = row if alone else None
        if alone:
            with self.turning:
                self.turn()
        return alone

    def used_tokens(self) -> int:
        return sum(r.length for r in list(self.rows))

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()

    # ---- engine thread ----
    def run_forever(self) -> None:
        while True:
            with self.cv:
                while not self.closed and (self.solo is not None or not self.waiting and not self.rows):
                    self.cv.wait()
                if self.closed:
                    break
            with self.turning:
                self.turn()
        with self.turning:
            for row in [*self.rows, *self.waiting]:
                row.sink(RuntimeError("the model was closed"))
                row.sink(END)
            self.rows, self.waiting = [], collections.deque()

    def turn(self) -> None:
        """Admit, prefill up to one chunk of prompt tokens, decode every row with a token to feed."""
        self._admit()
        budget = self.prefill_chunk
        for row in [r for r in self.rows if r.pending is None]:
            if budget <= 0:
                break
            n = min(budget, len(row.prompt) - row.length)
            budget -= n
            self.run_step([row], row.prompt[row.length:row.length + n].tolist(), n,
                      final=row.length + n == len(row.prompt))
        decoding = [r for r in self.rows if r.pending is not None]
        if decoding:
            self.run_step(decoding, [r.pending for r in decoding], 1, final=True)

    def _admit(self) -> None:
        # consumer gone, or cancelled before its first token (a decoding row's next token carries "cancelled")
        for row in [r for r in self.rows if r.gone() or r.pending is None and r.cancel()]:
            self._release(row)
        if not self.waiting:  # (a hint without the lock: a row submitted now is admitted next turn)
            return
        with self.cv:
            for row in [r for r in self.waiting if r.gone() or r.cancel()]:  # gone before it got a slot
                self.waiting.remove(row)
                row.sink(END)
            while self.waiting and self.pool.free:
                row = self.waiting.popleft()
                row.slot = self.pool.take()
                self.rows.append(row)

    def run_step(self, rows: list[Row], ids: list[int], new: int, final: bool):
        """One execution: `ids` are the rows' new tokens, `new` per row, row-major. Returns the step's views (None
        when it failed: the error went to the rows' sinks). Called from the loop's turns, and by a step model that
        drives single rows itself (`trt-gemma check`, runtime/engine_backend.PoolStepModel)."""
        batch = len(rows)
        lengths = [r.length for r in rows]
        longest = max(lengths)
        if longest + new > self.pool.zeroed:  # before this step's rows land: never zeroed after
            self.pool.ensure_zeroed(self._round(longest + new))
        header = np.array(ids + lengths + [r.slot for r in rows], np.int64)
        try:
            profile, views = self._plan(longest, batch, new)
            self.ex.upload(views.header, header)
            self.ex.run(profile, views.bindings)
            self.pool.write_rows(views.new_kv, [(r.slot, n) for r, n in zip(rows, lengths)])
            picks = self._sample(rows, views) if final else None
        except Exception as e:  # noqa: BLE001 - reported to the requests of this step; the loop carries on
            for row in rows:
                row.sink(e)
                self._release(row)
            return None
        bucket = views.bindings["past_positions"].shape[0]
        self.steps += 1
        self.kv_rows_read += bucket * batch
        self.kv_rows_needed += sum(lengths)
        now = time.perf_counter()
        for b, row in enumerate(rows):
            row.length += new
            if picks is not None:
                self._emit(row, picks[b], now)
        return views

    def _plan(self, longest: int, batch: int, new: int):
        """(profile, views) of a step: the past length rounded up to a bucket, under the profile whose ranges take
        the step's shapes. Where none takes the bucket (the decode profile's past ends at max_seq_len - 1, below
        the last bucket's round-up), the exact past length: near the limits only, so not cached."""
        bucket = self._round(longest)
        views = self.staging.views(bucket, batch, new)
        if not self.profiles:
            return 0, views
        key = (bucket, batch, new)
        profile = self._step_profile.get(key)
        if profile is None:
            try:
                profile = self._step_profile[key] = select_profile(_shapes(views), self.profiles)
            except InputError:
                views = self.staging.views(longest, batch, new)
                return select_profile(_shapes(views), self.profiles), views
        return profile, views

    def _round(self, n: int) -> int:
        return min(self.pool.shape.capacity, max(1, -(-n // self.kv_bucket)) * self.kv_bucket)

    def _sample(self, rows: list[Row], views) -> list[int]:
        """One token per row from what the step returned (downloaded only as far as some row needs it)."""
        batch, k = len(rows), self.top_k
        needs = [r.need for r in rows]
        if "topk" in needs or "full" in needs:
            ids_out = self.ex.download(views.ids_out)
            topk_ids, topk_lp = ids_out[batch:].reshape(batch, k), self.ex.download(views.topk_logprobs)
        else:
            ids_out = self.ex.download(views.bindings["next_token"])
        logits = self.ex.download(views.logits) if "full" in needs else None
        picks = []
        for b, (row, need) in enumerate(zip(rows, needs)):
            if need == "greedy":
                picks.append(int(ids_out[b]))
            elif need == "topk":
                order = np.argsort(topk_ids[b], kind="stable")
                picks.append(int(topk_ids[b][order][row.sampler(topk_lp[b][order])]))
            else:
                picks.append(row.sampler(logits[b]))
        return picks

    def _emit(self, row: Row, token: int, now: float) -> None:
        row.generated += 1
        reason = None
        if token in row.stops:
            reason = "stop"
        elif row.generated >= row.params.max_tokens or row.length >= self.limit:
            reason = "length"
        elif row.cancel() or row.gone():
            reason = "cancelled"
        row.sink((token, now - row.last_t, row.generated == 1, reason))
        row.last_t = now
        if reason is None:
            row.pending = token
        else:
            self._release(row)

    def _release(self, row: Row) -> None:
        if row in self.rows:
            self.rows.remove(row)
            self.pool.give_back(row.slot)
            row.slot, row.length = -1, 0
            row.sink(END)


def _shapes(views) -> dict[str, tuple[int, ...]]:
    return {name: tuple(v.shape) for name, v in views.bindings.items()}
