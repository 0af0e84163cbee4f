"""The bounded generation scheduler shared by the Python API (trt_gemma.api) and the HTTP server (trt_gemma.serve.app).

Concurrency model: each admitted request holds one of `max_concurrency` generation slots while a worker thread runs
`backend.stream()` (numpy releases the GIL in its matmuls; TensorRT-LLM runs on the GPU). At most `max_queue` more
requests may wait for a slot (None: no bound, for in-process callers that choose to block). Waiters are served in
arrival order and may be threads (`Admission.acquire`) or asyncio tasks (`Admission.wait_slot`) on any event loop;
one `Admission` serves both at once. A slot is given back when its worker thread has actually returned, so a
consumer that stops listening (its cancel flag, polled by the backend after every token, turns true) frees it for
real, one decode step later at most.

Steps cross from the worker to the consumer through a locked list (`Generation`): an asyncio consumer wakes once per
flush (see `Generation.batches`), a thread consumer once per token (`Generation.steps`). A thread consumer whose
generation is the only one (running or waiting) skips the worker: it runs `backend.stream()` on its own thread, one
step per `next()`, with no hand-over. The moment another generation takes a slot or waits for one (or the scheduler
closes), it moves to a worker thread between two steps (`Scheduler.crowd`): a consumer that stops iterating for a
while then never holds up another generation, which is what the worker thread is for. `TextPieces` turns steps into
text deltas, cutting stop strings (runtime/stops.StopMatcher), the same way for the server and the API.

A step-loop backend (runtime/batched.py: onnxruntime now, TensorRT next) batches inside `stream()`: every admitted
request becomes a row of one engine loop that advances all of them per graph execution (runtime/steploop.py), and
the threads here only carry each row's tokens, so admission, queueing, 429 and cancellation are the same for it.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable, Generator, Iterator

from trt_gemma.runtime.base import Backend, GenerationParams, Step
from trt_gemma.errors import ResourceError
from trt_gemma.runtime.stops import StopMatcher

_END = object()
QUEUE_POLL_S = 0.05  # how often a thread waiting for a slot checks whether its request was cancelled


class Admission:
    """Bounded admission: `max_concurrency` slots plus `max_queue` waiting places (None = unbounded). Thread-safe.

    Protocol: `try_enter()` takes a waiting place (False when full), then exactly one of `wait_slot()` (asyncio),
    `acquire()` (threads) or `leave_queue()` (gave up before waiting); whoever got a slot calls `release()` once.
    A released slot goes straight to the oldest waiter, so `running` never exceeds `max_concurrency`."""

    def __init__(self, max_concurrency: int, max_queue: int | None):
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.running = self.waiting = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[Callable[[], None]] = collections.deque()
        self.on_wait: Callable[[], None] = lambda: None  # someone queued for a slot (Scheduler.crowd)

    def full(self) -> bool:
        """No waiting place left now (a hint without the lock: `try_enter` decides)."""
        return self.max_queue is not None and self.running + self.waiting >= self.max_concurrency + self.max_queue

    def try_enter(self) -> bool:
        with self._lock:
            if self.full():
                return False
            self.waiting += 1
            return True

    def _take_free(self) -> bool:
        """Under the lock: take a free slot if nobody queued earlier is waiting for it."""
        if self.running < self.max_concurrency and not self._waiters:
            self.running += 1
            self.waiting -= 1
            return True
        return False

    async def wait_slot(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def grant() -> None:  # any thread: the slot is now ours (running unchanged: handed over)
            try:
                loop.call_soon_threadsafe(_granted, fut, self)
            except RuntimeError:  # that event loop is closed: nobody will take the slot
                self.release()

        with self._lock:
            if self._take_free():
                return
            self._waiters.append(grant)
        self.on_wait()
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                queued = grant in self._waiters
                if queued:
                    self._waiters.remove(grant)
                    self.waiting -= 1
            if not queued and fut.done() and not fut.cancelled():
                self.release()  # granted just before the cancellation landed (else `_granted` gives it back)
            raise

    def acquire(self, cancelled: threading.Event) -> bool:
        """Block the calling thread until a slot is ours (True), or `cancelled` is set while waiting (False)."""
        got = threading.Event()
        with self._lock:
            if cancelled.is_set():  # cancelled before it ever waited
                self.waiting -= 1
                return False
            if self._take_free():
                return True
            self._waiters.append(got.set)
        self.on_wait()
        while not got.wait(QUEUE_POLL_S):
            if cancelled.is_set():
                with self._lock:
                    if got.set in self._waiters:
                        self._waiters.remove(got.set)
                        self.waiting -= 1
                        return False
                break  # granted meanwhile: we hold the slot, give it back below
        if cancelled.is_set():
            self.release()
            return False
        return True

    def leave_queue(self) -> None:
        """An admitted request that never started waiting (failed before streaming)."""
        with self._lock:
            self.waiting -= 1

    def release(self) -> None:
        with self._lock:
            if not self._waiters:
                self.running -= 1
                return
            self.waiting -= 1
            grant = self._waiters.popleft()
        grant()  # outside the lock: an asyncio grant whose loop is gone releases again


def _granted(fut: "asyncio.Future[None]", admission: Admission) -> None:
    if fut.cancelled():  # its task is gone: pass the slot on
        admission.release()
    else:
        fut.set_result(None)


class QueueFull(ResourceError):
    """No waiting place left (max_queue generations already wait): the API raises it, the server answers 429."""


@dataclass
class Scheduler:
    """A backend's generation slots: the one object the Python API (api.Model) and the HTTP server (serve.Server)
    both hand their requests to. `backend` may be None until a lazily loaded model arrives (the server)."""

    backend: Backend | None
    admission: Admission | None
    pool: ThreadPoolExecutor
    stream_interval_s: float = 0.0
    live: "weakref.WeakSet[Generation]" = field(default_factory=weakref.WeakSet)  # cancelled by close()
    inline: "set[Generation]" = field(default_factory=set)  # running on their consumer's thread (Generation.steps)
    closed: bool = False
    _weights: tuple[Backend, int] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, backend: Backend | None, max_concurrency: int, max_queue: int | None,
               stream_interval_s: float = 0.0, admission: Admission | None = None) -> "Scheduler":
        """`admission`: a subclass instance that observes slots (the server's service-rate estimate)."""
        sched = cls(backend, admission or Admission(max_concurrency, max_queue),
                    ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="trt-gemma-gen"),
                    stream_interval_s)
        sched.admission.on_wait = sched.crowd  # type: ignore[union-attr]
        return sched

    def go_inline(self, gen: "Generation") -> bool:
        """May `gen` (holding a slot) run on its consumer's thread? Only while it is alone. Registered first and
        checked after, while `crowd` callers count themselves first and scan after: one of the two sees the other."""
        adm = self.admission
        assert adm is not None
        with gen._drive:  # nobody moves it meanwhile
            self.inline.add(gen)
            if self.closed or adm.running > 1 or adm._waiters:
                self.inline.discard(gen)
                return False
            return True

    def crowd(self, wait: bool = False) -> None:
        """Another generation took a slot or waits for one: move every inline generation to a worker thread (`wait`:
        also for the step in progress; otherwise its consumer moves it after that step)."""
        for gen in list(self.inline):
            gen.to_pool(wait)

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> "Generation":
        """Take a waiting place for one generation (QueueFull when none is left); it asks for a slot when its
        consumer starts iterating (`Generation.batches` / `steps`), or gives the place back (`abandon`)."""
        adm = self.admission
        assert adm is not None and self.backend is not None, "submit() needs a loaded backend"
        if not adm.try_enter():
            raise QueueFull(f"busy: {adm.running} generations running and {adm.waiting} waiting "
                            f"(max_queue {adm.max_queue})",
                            fix="retry later, or load() with a larger max_queue (None: no bound)")
        gen = Generation(self, prompt_ids, params)
        self.live.add(gen)
        return gen

    def weights_bytes(self) -> int:
        """The loaded backend's weight bytes (fixed for a backend: asked once, not per request)."""
        backend = self.backend
        assert backend is not None
        if self._weights is None or self._weights[0] is not backend:
            self._weights = (backend, backend.memory().weights_bytes)
        return self._weights[1]

    def close(self, wait: bool) -> None:
        """Cancel every live generation (running or waiting) and stop the worker pool (`wait`: for its threads)."""
        self.closed = True
        for gen in list(self.live):
            gen.cancelled.set()
        self.crowd(wait=True)  # their last (cancelled) step runs on the pool, which the shutdown waits for
        self.pool.shutdown(wait=wait, cancel_futures=True)


class Generation:
    """One request's generation on a worker thread, observed as batches of Steps by an asyncio task (`batches`) or
    a thread (`steps`).

    Hand-over is a locked list: the loop wakes once per flush (its interval timer), never per token, and flushes
    at most every `stream_interval_s` (the first token and the last one go out at once, so TTFT and end-to-end
    latency are untouched). Measured with benchmarks/serve_overhead.py on a busy 2-core host: one chunk per token
    cost 15-25% of decode throughput (each chunk is a GIL hand-over between the loop and the generating thread,
    plus the client's parsing); with 50 ms intervals it is a few percent, about the run-to-run noise there."""

    def __init__(self, server: Scheduler, prompt_ids: list[int], params: GenerationParams):
        self.server, self.prompt_ids, self.params = server, prompt_ids, params
        self.cancelled = threading.Event()
        self.failure: BaseException | None = None
        self.started = False  # batches()/steps() began: from then on it owns the admission bookkeeping
        self.slot_at: float | None = None  # perf_counter() when it got its slot (queueing time)
        self.generated = 0  # steps the worker produced (read after the fact: how soon a cancel took effect)
        self._lock = threading.Lock()
        self._items: list[Any] = []
        self._wake: Callable[[], None] | None = None  # set while the consumer sleeps: the next push must wake it
        self._on_final: Callable[[], None] | None = None
        self._ready = asyncio.Event()
        self._final = asyncio.Event()  # the last item is in: flush without waiting for the interval
        self._it: Iterator[Step] | None = None  # the backend's steps while they run on the consumer's thread
        self._drive = threading.Lock()  # held while the consumer's thread runs one step, or while moving it
        self._want_pool = False  # crowd() asked to move: the consumer moves it after the step in progress

    def _begin(self) -> bool:
        """The consumer starts: from here on it owns the admission bookkeeping (False: abandoned before)."""
        with self._lock:
            fresh, self.started = not self.started, True
        return fresh

    def abandon(self) -> None:
        """Stop the worker (any thread); a generation whose consumer never started gives its queue place back."""
        self.cancelled.set()
        with self._lock:
            owes_place, self.started = not self.started, True
        if owes_place:
            assert self.server.admission is not None
            self.server.admission.leave_queue()

    def _push(self, item: Any, final: bool) -> None:
        """Worker thread side: wake the consumer only if it is idle-waiting for items (not during its interval)."""
        with self._lock:
            self._items.append(item)
            wake, self._wake = self._wake, None
        try:
            if wake is not None:
                wake()
            if final and self._on_final is not None:
                self._on_final()
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.cancelled.set()

    def _work(self, steps: Iterator[Step] | None = None) -> None:
        backend = self.server.backend
        assert backend is not None, "a generation starts only on a loaded backend"
        try:
            if steps is None:
                steps = iter(backend.stream(self.prompt_ids, self.params, cancel=self.cancelled.is_set))
            for step in steps:
                self.generated += 1
                self._push(step, step.finish_reason is not None)
        except BaseException as e:  # reported to the request, never to the server
            self._push(e, True)
        finally:
            self._push(_END, True)

    def _start(self, submit: Callable[[], Any]) -> None:
        """Run the worker on the pool; the slot is released when it has returned (or never ran: pool shut down)."""
        admission = self.server.admission
        assert admission is not None
        try:
            fut = submit()
        except BaseException:
            admission.release()
            raise
        fut.add_done_callback(self._done)

    def _done(self, fut: Any) -> None:
        if fut.cancelled():  # moved from the consumer's thread but never ran: end the backend's steps here
            getattr(self._it, "close", lambda: None)()
        self.server.admission.release()  # type: ignore[union-attr]
        if fut.cancelled():  # shut down before it started: end the consumer's wait
            self._push(RuntimeError("the generation pool was shut down"), True)
            self._push(_END, True)

    def _grab(self, wake: Callable[[], None]) -> list[Any] | None:
        """Take what came, or register `wake` for the next push and return None."""
        with self._lock:
            if self._items:
                items, self._items = self._items, []
                return items
            self._wake = wake
            return None

    async def _take(self, interval: float, last_flush: float, wake: Callable[[], None]) -> list[Any]:
        """Sleep out the rest of the interval (the final item cuts it short), then take what came, or wait for it."""
        delay = last_flush + interval - asyncio.get_running_loop().time()
        if delay > 0 and not self._final.is_set():
            try:
                await asyncio.wait_for(self._final.wait(), delay)
            except asyncio.TimeoutError:
                pass
        while True:
            self._ready.clear()
            items = self._grab(wake)
            if items is not None:
                return items
            await self._ready.wait()

    def _consume(self, items: list[Any]) -> tuple[list[Step], bool]:
        """(the steps among `items`, whether the generation is over); a failure is kept in `self.failure`."""
        errors = [i for i in items if isinstance(i, BaseException)]
        if errors:
            self.failure = errors[0]
        return [i for i in items if isinstance(i, Step)], bool(errors) or _END in items

    async def batches(self) -> AsyncGenerator[list[Step], None]:
        """Waits for a slot, starts the worker, yields the steps gathered at each flush."""
        srv = self.server
        assert srv.admission is not None
        if not self._begin():
            return
        await srv.admission.wait_slot()
        self.slot_at = time.perf_counter()
        srv.crowd()  # a generation running on its consumer's thread is not alone any more
        loop = asyncio.get_running_loop()

        def on_final() -> None:
            loop.call_soon_threadsafe(self._final.set)

        def wake() -> None:
            loop.call_soon_threadsafe(self._ready.set)

        self._on_final = on_final
        self._start(lambda: srv.pool.submit(self._work))
        last_flush = float("-inf")
        try:
            while True:
                items = await self._take(srv.stream_interval_s, last_flush, wake)
                last_flush = loop.time()
                steps, over = self._consume(items)
                if steps:
                    yield steps
                if over:
                    return
        finally:
            # client gone or we stopped early (stop string): the worker ends at its next step. Set on the loop's next
            # turn, so what the consumer does while this exception unwinds (the server's request metrics) happens
            # before the worker can give its slot back; closing the AsyncStream sets it at once
            try:
                loop.call_soon(self.cancelled.set)
            except RuntimeError:  # the loop is closed
                self.cancelled.set()

    def to_pool(self, wait: bool) -> None:
        """Move an inline generation to a worker thread (any thread): now if no step is running (or `wait`), else
        its consumer does it after the step in progress."""
        self._want_pool = True
        if self._drive.acquire(blocking=wait):
            try:
                self._move()
            finally:
                self._drive.release()

    def _move(self) -> None:
        """Under `_drive`: hand the backend's steps to the pool; the consumer reads them from the list from now on."""
        it = self._it
        if it is None or self not in self.server.inline:
            return
        try:
            fut = self.server.pool.submit(self._work, it)
        except RuntimeError:  # the pool is shut down: close() waits for the step in progress and moves it first
            return
        self.server.inline.discard(self)
        fut.add_done_callback(self._done)

    def _inline_end(self) -> None:
        """Under `_drive`: the inline generation is over (or its consumer left): close it, give the slot back."""
        if self._it is not None and self in self.server.inline:
            self.server.inline.discard(self)
            try:
                getattr(self._it, "close", lambda: None)()  # a generator: the backend frees its KV before the slot
            finally:
                self.server.admission.release()  # type: ignore[union-attr]

    def _step_inline(self) -> tuple[Step | None, str]:
        """One step on the consumer's thread: (the step or None, where the generation is after it: "here", "pool"
        (moved: read the list) or "over")."""
        with self._drive:
            if self not in self.server.inline:
                return None, "pool"  # moved by crowd() since the last step
            assert self._it is not None
            try:
                step = next(self._it)
            except StopIteration:
                self._inline_end()
                return None, "over"
            except BaseException as e:  # reported as the worker's failures are (Run.finish raises it)
                self.failure = e
                self._inline_end()
                return None, "over"
            self.generated += 1
            if self._want_pool:
                self._move()
            return step, "here" if self in self.server.inline else "pool"

    def steps(self) -> Generator[list[Step], None, None]:
        """Thread side of `batches`: blocks for a slot (False from a cancel while queued ends it), then yields the
        steps that came since the last call, without an interval (no event loop to spare here). A generation that
        is alone runs on this thread (one step per call) until `crowd` moves it to the pool."""
        srv = self.server
        assert srv.admission is not None and srv.backend is not None
        if not self._begin():
            return
        if not srv.admission.acquire(self.cancelled):
            return
        self.slot_at = time.perf_counter()
        try:
            self._it = iter(srv.backend.stream(self.prompt_ids, self.params, cancel=self.cancelled.is_set))
        except BaseException:
            srv.admission.release()
            raise
        try:
            if srv.go_inline(self):
                where = "here"
                while where == "here":
                    step, where = self._step_inline()
                    if step is not None:
                        yield [step]
                if where == "over":
                    return
            else:
                srv.crowd()  # not alone: nobody runs on a consumer's thread now
                self._start(lambda: srv.pool.submit(self._work, self._it))
            yield from self._pooled_steps()
        finally:
            self.cancelled.set()
            with self._drive:
                self._inline_end()

    def _pooled_steps(self) -> Generator[list[Step], None, None]:
        """What the worker pushed since the last call (blocks until something came)."""
        ready = threading.Event()
        while True:
            ready.clear()
            items = self._grab(ready.set)
            if items is None:
                ready.wait()
                continue
            steps, over = self._consume(items)
            if steps:
                yield steps
            if over:
                return


@dataclass
class TextPieces:
    """Steps -> text deltas with stop strings cut (the matcher withholds text that could still become one).
    `token_ids` are the text tokens consumed so far (a stop token is not text, as in `trt-gemma generate`);
    `completion_tokens` counts every step consumed, stop token included (the server's usage figure)."""

    stops: list[str]
    finish: str | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.stops)

    def feed(self, steps: list[Step]) -> tuple[str, list[Step]]:
        """(text to emit now, the steps consumed: the batch up to the finishing one); sets `finish` at the end."""
        text: list[str] = []
        for n, s in enumerate(steps, 1):
            self.completion_tokens += 1
            if s.finish_reason != "stop":
                self.token_ids.append(s.token_id)
            out, stopped = self.matcher.push(s.text)
            text.append(out)
            if stopped or s.finish_reason:
                self.finish = "stop" if stopped else s.finish_reason
                return "".join(text) + self.matcher.flush(), steps[:n]
        return "".join(text), steps
